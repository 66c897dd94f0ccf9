"""Error tables from what runs wrote: every metrics.json below some folders, in the paper's layout.

``collect(dirs)`` reads the runs into a pandas DataFrame, ``cells(runs)`` makes the table's cells
(``by_lr`` one per learning rate) and ``write(runs, out)`` the files; what each file holds and how
a cell is read and its learning rate chosen: docs/sweeps.md, "stnbench-report".
"""

import json
import math
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from stnbench import curves, geometry, legacy, models, tasks
from stnbench.errors import StnbenchError
from stnbench.files import atomic_path

# the paper's, in its order; addition is Appendix A.1's table, beside Table 1's columns
COLUMNS = {"r": "R", "rts": "RTS", "p": "P", "e": "E", "tc": "TC", "addition": "Addition"}

# Reported test error (%): Table 1, TC from the text (its ST models taken as affine), and
# Appendix A.1's MNIST addition (2xST-FCN: two transformers side by side, taken as affine).
PAPER = {
    "FCN": {"r": 2.1, "rts": 5.2, "p": 3.1, "e": 3.2, "tc": 13.2, "addition": 47.7},
    "CNN": {"r": 1.2, "rts": 0.8, "p": 1.5, "e": 1.4, "tc": 3.5, "addition": 14.7},
    "ST-FCN Aff": {"r": 1.2, "rts": 0.8, "p": 1.5, "e": 2.7, "tc": 2.0, "addition": 18.5},
    "ST-FCN Proj": {"r": 1.3, "rts": 0.9, "p": 1.4, "e": 2.6},
    "ST-FCN TPS": {"r": 1.1, "rts": 0.8, "p": 1.4, "e": 2.4},
    "2xST-FCN Aff": {"addition": 5.8},
    "ST-CNN Aff": {"r": 0.7, "rts": 0.5, "p": 0.8, "e": 1.2, "tc": 1.7},
    "ST-CNN Proj": {"r": 0.8, "rts": 0.6, "p": 0.8, "e": 1.3},
    "ST-CNN TPS": {"r": 0.7, "rts": 0.5, "p": 0.8, "e": 1.1},
}
PAPER_BUDGET = (150_000, 256)  # its steps and batch size (Appendix A.4)
LEGEND = (
    "Test error (%) of the final model: mean ± std over the runs that ended ok (how many); in "
    "brackets the runs that collapsed, diverged, failed, are unfinished, unreadable or "
    "inconsistent; `@ lr`: "
    "the learning rate chosen on validation. Paper: Jaderberg et al. 2015, Table 1 (TC: the "
    "text; Addition: Appendix A.1), 150,000 steps of 256. After ours, how ours trained where it "
    "differs: another budget, or fresh distortions every epoch rather than a fixed set."
)
REQUIRED = ("status", "data", "model", "lr", "seed")  # what every run's row needs
STATUSES = ("ok", "collapsed", "diverged", "failed", "unfinished", "unreadable", "inconsistent")
# what a cell's brackets count: the runs that did not end ok, and the runs (any status) whose
# transformer stopped following its input (metrics.json's transformer_dead)
FLAGS = {**{s: s for s in STATUSES[1:]}, "dead": "dead transformer"}
# Settings that should agree within one cell; the report warns where they do not.
BUDGET = ("optim", "schedule", "planned_steps", "batch_size", "train_size", "loc_lr_mult", "fresh")
SEARCHED = "searched"  # a row's loc_lr_mult when its runs are a search's trials
REGIMES = {False: "fixed set", True: "fresh draws"}  # metrics.json's fresh: the data regime


def row_label(
    model: str,
    transform: str | None,
    residual=False,
    tanh=False,
    loc_lr_mult=1,
    transformers=1,
    multi=False,
    fixed_set=False,
) -> str:
    """The table's row name, from the registries' labels ("ST-CNN Aff", the paper's), variants
    marked after it. A run has a transformer when it records a transform (metrics.json's
    ``transform``, from models.is_st). ``loc_lr_mult`` is SEARCHED for the trials of a search
    (hparams_search), whose lrs and multipliers differ from trial to trial."""
    st = isinstance(transform, str)
    arch, kind = models.MODELS.get(model), (geometry.KINDS.get(transform) if st else None)
    label = arch.label if arch else model  # a model or kind no longer registered: its name
    if st:
        label += " " + (kind.label if kind else transform)
    if st and transformers > 1:  # side by side: the paper's 2xST-FCN
        label = f"{transformers}x{label}"
    marks = ["tanh" if tanh else "residual"] if tanh or residual else []
    if multi:  # a transformer on the feature maps too (the paper's ST-CNN Multi)
        marks.append("multi")
    if fixed_set:  # where the model also has runs on fresh draws
        marks.append(REGIMES[False])
    if loc_lr_mult == SEARCHED:  # a search's trials: their own row, apart from any grid's
        marks.append("searched")
    elif st and not pd.isna(loc_lr_mult) and loc_lr_mult != 1:  # None / NaN: not recorded
        marks.append(f"loc lr x{loc_lr_mult:g}")
    return label + (f" ({', '.join(marks)})" if marks else "")


def _unfinished(folder: Path) -> dict | None:
    """A run Hydra started that wrote no metrics.json yet (running, killed or refused)."""
    from stnbench.rundir import settings

    try:
        m = settings(OmegaConf.load(folder / ".hydra" / "config.yaml"))
    except Exception:  # not a stnbench run folder (a Hydra app of another kind, a partial copy)
        return None
    del m["torch"]  # this process's, not the run's
    reason = "no metrics.json (still running, killed, or refused: see its train.log)"
    return {"status": "unfinished", "reason": reason, **m}


def _identity(folder: Path) -> str | None:
    """A run's identity (stnbench.config.identity) from the config.json it wrote when it
    started, else its Hydra config; None where neither reads as a training run's."""
    from stnbench.config import identity

    started, composed = folder / "config.json", folder / ".hydra" / "config.yaml"
    for read in (lambda: json.loads(started.read_text()),
                 lambda: OmegaConf.to_container(OmegaConf.load(composed))):  # fmt: skip
        try:
            return identity(read())
        except Exception:  # missing, unreadable or not a stnbench-train config
            continue
    return None


def set_aside_duplicates(runs: pd.DataFrame) -> pd.DataFrame:
    """Each configuration once: of the folders that hold one identity (another spelling of the
    command, a copy of a sweep), the one that ended first (ok, collapsed, diverged), else failed,
    else unfinished, first by path; attrs["duplicates"] names the others and the one kept."""
    known = runs.identity if "identity" in runs else pd.Series(None, runs.index, object)
    tabulated = runs.tabulated.notna() if "tabulated" in runs else pd.Series(False, runs.index)
    # a runs.csv's identity as it recorded it (none: never set aside), else the folder's
    runs = runs.assign(identity=[
        i if isinstance(i, str) else None if t else _identity(Path(p))
        for i, t, p in zip(known, tabulated, runs.path, strict=True)
    ])  # fmt: skip
    rank = runs.status.map({"failed": 1, "unfinished": 2, "unreadable": 3, "inconsistent": 3})
    rank = rank.fillna(0)
    order = runs.assign(rank=rank).sort_values(["rank", "path"], kind="stable")
    twin = order.identity.notna() & order.duplicated("identity")
    kept = order[~twin].dropna(subset=["identity"]).set_index("identity").path
    out = runs.loc[sorted(order.index[~twin])].reset_index(drop=True)
    out.attrs["duplicates"] = [
        f"{run.path}: the same configuration as {kept[run.identity]}; set aside, counted once"
        for run in order[twin].itertuples()
    ]
    return out


def tabulated(path: Path) -> tuple[list[dict], list[str]]:
    """The runs of a runs.csv that write() wrote (a committed results folder's), as collect()'s
    records, and its columns in order: its cells can be rebuilt, in today's layout, where the
    run folders are gone."""
    try:
        runs = pd.read_csv(path)
    except (ValueError, OSError) as e:
        raise StnbenchError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    missing = [k for k in (*REQUIRED, "path") if k not in runs]
    if missing:
        raise StnbenchError(
            f"{path}: no {', '.join(missing)} column (expected a runs.csv that stnbench-report "
            "wrote)"
        )
    columns = list(runs.columns)
    runs = runs.drop(columns=["row"], errors="ignore").astype(object)
    records = [{k: v for k, v in run.items() if not pd.isna(v)} for run in runs.to_dict("records")]
    # its paths are where the runs were: nothing is read from them (identity; the curves come
    # from the curves.csv beside it, stnbench.curves.committed)
    return [{**m, "tabulated": str(path)} for m in records], columns


def collect(dirs: list[str | Path]) -> pd.DataFrame:
    """One row per run folder below ``dirs``: its metrics.json, or an unfinished Hydra run;
    a ``dirs`` entry may also be a runs.csv (``tabulated``)."""
    from stnbench.rundir import disagreement

    records, unreadable, header = {}, [], []
    for d in map(Path, dirs):
        if d.is_file() and d.suffix == ".csv":  # a runs.csv this command wrote: tabulated again
            runs, columns = tabulated(d)
            for m in runs:
                records[("csv", str(d), m["path"])] = {**m, "source": m.get("source") or str(d)}
            header += [k for k in columns if k not in header]
            continue
        if not d.is_dir():
            raise StnbenchError(
                f"{d}: no such folder (expected a folder of runs, or a runs.csv it wrote)"
            )
        for path in sorted(d.rglob("metrics.json")):
            folder = path.parent.resolve()
            try:
                m = json.loads(path.read_text())
                problem = None if isinstance(m, dict) else "not an object"
            except ValueError as e:
                m, problem = {}, f"{type(e).__name__}: {e}"
            if problem is None and m.get("status") not in STATUSES:
                problem = f"status {m.get('status')!r}"
            missing = [k for k in REQUIRED if k not in m]
            if problem or missing:  # skipped; counted in its cell if its Hydra config tells which
                problem = f"{path}: unreadable ({problem or 'no ' + ', '.join(missing)}); skipped"
                unreadable.append(problem)
                if (m := _unfinished(path.parent)) is None:
                    continue
                m.update(status="unreadable", reason=problem)
            if (why := disagreement(m)) is not None:  # never a result
                unreadable.append(f"{path}: inconsistent ({why}); not counted as a result")
                m.update(status="inconsistent", reason=why)
            if "fresh" not in m:  # written before metrics.json recorded the data regime
                m["fresh"] = legacy.fresh_of(path.parent)
            records[folder] = {**m, "path": str(path.parent), "source": str(d)}
        for hydra_dir in sorted(d.rglob(".hydra")):
            folder = hydra_dir.parent.resolve()
            if folder not in records and (m := _unfinished(hydra_dir.parent)) is not None:
                records[folder] = {**m, "path": str(hydra_dir.parent), "source": str(d)}
    if not records:
        raise StnbenchError(
            f"no readable runs below {', '.join(map(str, dirs))} (expected metrics.json files "
            f"that stnbench-train writes){'; ' + unreadable[0] if unreadable else ''}"
        )
    runs = pd.DataFrame(list(records.values()))
    # a runs.csv's columns in its order, empty ones too (its runs leave out their empty
    # fields), then the rest
    runs = runs.reindex(columns=header + [k for k in runs if k not in header])
    runs = set_aside_duplicates(runs)
    optional = ("transform", "residual", "tanh", "loc_lr_mult", "test_error", "val_error",
                "transformer_dead", "searched", "transformers", "multi",
                "loc_lr_every_transformer", "fresh")  # fmt: skip
    runs = runs.assign(**{k: None for k in optional if k not in runs})
    runs.attrs["unreadable"] = unreadable  # warnings() names them
    loc = runs.loc_lr_mult.astype(float).fillna(1.0)  # not recorded: written before it was 1
    # a multiplier marks a row only where it tells the model's runs apart (one protocol's
    # multiplier is a training setting like its lr); a search's trials each have their own
    grid = loc.where(runs.searched.ne(True))  # a search's trials do not relabel the grid's runs
    loc = loc.where(
        grid.groupby([runs.model, runs["transform"]], dropna=False).transform("nunique") > 1, 1.0
    )
    loc = loc.astype(object).where(runs.searched.ne(True), SEARCHED)
    columns = [runs[k] for k in ("model", "transform", "residual", "tanh")] + [loc]
    columns.append(runs.transformers.astype(float).fillna(1).astype(int))  # recorded since A.1
    columns.append(runs.multi.eq(True))
    # a fixed set marks the row only where the model has runs on fresh draws too
    model = [runs.model, runs["transform"]]
    mixed = runs.fresh.eq(True).groupby(model, dropna=False).transform("nunique") > 1
    columns.append(mixed & runs.fresh.ne(True))
    runs["row"] = [
        row_label(m, t, r is True, h is True, lm, n, mu, fs)
        for m, t, r, h, lm, n, mu, fs in zip(*columns, strict=True)
    ]
    return runs.sort_values(["row", "data", "lr", "seed", "path"], ignore_index=True)


def _order(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Rows and columns present, the paper's first in its order, then the others by name."""

    def known_first(values, known: list) -> list:
        return sorted(set(values), key=lambda v: (known.index(v) if v in known else 99, v))

    return known_first(runs.row, list(PAPER)), known_first(runs["data"], list(COLUMNS))


def _stats(group: pd.DataFrame) -> dict:
    errors = group.test_error[group.status == "ok"].astype(float)
    # none ok: mean NaN; one: std NaN (over seeds, n - 1)
    out = {"mean": errors.mean(), "std": errors.std(), "n": len(errors)}
    for status in STATUSES[1:]:
        out[status] = int((group.status == status).sum())
    out["dead"] = int(group.transformer_dead.eq(True).sum())
    budget = group.reindex(columns=["planned_steps", "batch_size"])
    out["budget"] = "; ".join(sorted({_budget(*b) for b in budget.itertuples(index=False)} - {""}))
    out["regime"] = "; ".join(sorted({REGIMES[f is True] for f in group.fresh}))
    return out


def _budget(steps, batch) -> str:
    """A run's budget in words where it is not the paper's, else ''."""
    if pd.isna(steps) or (steps, batch) == PAPER_BUDGET:
        return ""
    return f"{steps:,.0f} steps" + ("" if pd.isna(batch) else f" of {batch:.0f}")


def selection_score(group: pd.DataFrame, metric=None) -> float:
    """How one lr's runs score on validation, lower better: the mean final validation metric
    (classification's error, else ``metric``'s; negated where higher is better) over its
    finished runs, a diverged or unscored run counting as the worst, 100% or 0%; inf for none."""
    name, lower = ("error", True) if metric is None else (metric.name, metric.lower_is_better)
    done = group[group.status.isin(["ok", "collapsed", "diverged"])]
    if done.empty:
        return math.inf
    worst = 100.0 if lower else 0.0
    val = done[f"val_{name}"].astype(float).where(done.status != "diverged", worst)
    mean = float(val.fillna(worst).mean())
    return mean if lower else -mean


def by_lr(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (row, data, lr): the statistics of those runs."""
    out = []
    for (row, data, lr), g in runs.groupby(["row", "data", "lr"], sort=False):
        out.append({"row": row, "data": data, "lr": lr, **_stats(g), "score": selection_score(g)})
    return pd.DataFrame(out)


def cells(runs: pd.DataFrame, per_lr: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (model row, distortion) of the table, missing cells included."""
    rows, cols = _order(runs)
    per_lr = by_lr(runs) if per_lr is None else per_lr
    out = []
    for row in rows:
        for data in cols:
            options = per_lr[(per_lr.row == row) & (per_lr["data"] == data)]
            cell = {"row": row, "data": data}
            if options.empty:
                cell.update(mean=math.nan, std=math.nan, n=0, lr=math.nan, lrs=0, budget="",
                            regime="")  # fmt: skip
                cell.update(dict.fromkeys(FLAGS, 0))
            else:
                best = options.sort_values(["score", "lr"]).iloc[0]
                cell.update(best.drop(["row", "data", "score"]).to_dict())
                cell["lrs"] = len(options)
            cell["paper"] = PAPER.get(row, {}).get(data, math.nan)
            cell["diff"] = cell["mean"] - cell["paper"]
            out.append(cell)
    return pd.DataFrame(out)


def warnings(runs: pd.DataFrame) -> list[str]:
    """The metrics.json files that could not be read, cells whose runs differ in budget or
    optimiser (averaging them mixes experiments), and a runs.csv's curves left out."""
    out = list(runs.attrs.get("unreadable", [])) + list(runs.attrs.get("duplicates", []))
    out += curves.committed(runs)[1]
    done = runs[~runs.status.isin(["unfinished", "unreadable"])]
    for (row, data), g in done.groupby(["row", "data"]):
        for key in BUDGET:
            if key == "loc_lr_mult" and g.searched.eq(True).all():  # searched, like the lr
                continue
            if key in g and g[key].nunique(dropna=True) > 1:
                values = ", ".join(map(str, sorted(g[key].dropna().unique())))
                out.append(f"{row} on {data}: runs differ in {key} ({values})")
    old = pd.Series([legacy.before_loc_lr_fix(run) for _, run in done.iterrows()], done.index, bool)
    stale = done[old]  # a boolean mask, also where no run ended (a list would pick columns)
    for (row, data), g in stale.groupby(["row", "data"]):
        stale_runs = f"{len(g)} runs trained before commit 666d9d5"
        out.append(f"{row} on {data}: {stale_runs}, their transformers but the first at the full "
                   "lr; rerun them in a new folder")  # fmt: skip
    return out


# --- rendering ----------------------------------------------------------------------------------


def _fmt(x, digits=2) -> str:
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def _flags(cell) -> str:
    return ", ".join(f"{int(cell[k])} {text}" for k, text in FLAGS.items() if cell[k])


def cell_text(cell, pm="±", digits=2) -> str:
    """A cell's text: mean +- std (n) of its runs that ended ok, then in brackets how many did
    not (FLAGS' counts); 'missing' where there is no run. ``cell`` has n, mean, std and FLAGS'
    keys (a row of cells(), or a task's table's cell)."""
    if cell["n"] == 0 and not any(cell[s] for s in STATUSES[1:]):
        return "missing"
    text = "no ok run" if cell["n"] == 0 else _fmt(cell["mean"], digits)
    text += f" {pm} {_fmt(cell['std'], digits)}" if cell["n"] > 1 else ""
    text += f" ({int(cell['n'])})" if cell["n"] else ""
    return text + (f" [{flags}]" if (flags := _flags(cell)) else "")


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """The table in the paper's layout: a row per model, eight columns per distortion."""
    out = pd.DataFrame(index=pd.Index(list(dict.fromkeys(table.row)), name="model"))
    for data in dict.fromkeys(table["data"]):
        part, name = table[table["data"] == data].set_index("row"), COLUMNS.get(data, data)
        shown = {"": part["mean"].round(3), " std": part["std"].round(3), " n": part.n.astype(int),
                 " paper": part.paper, " budget": part.budget, " data": part.regime,
                 " diff": part["diff"].round(3),
                 " lr": part.lr, " not ok": part.apply(_flags, axis=1)}  # fmt: skip
        out = out.assign(**{name + suffix: values for suffix, values in shown.items()})
    return out


def _shown(table: pd.DataFrame, pm="±", diff="{:+.2f}") -> pd.DataFrame:
    """The cells as text: a row per model; per distortion ours, the paper's, the difference."""
    text = {}
    for _, c in table.iterrows():
        name = COLUMNS.get(c["data"], c["data"])
        notes = [c.budget] if c.budget else []  # how ours trained, beside ours (not the paper's)
        notes += [c.regime] if REGIMES[True] in c.regime else []  # a fixed set is the default
        text_ours = cell_text(c, pm) + (f" @ lr {c.lr:g}" if c.lrs > 1 else "")
        shown = {
            "ours": text_ours + (f"; {', '.join(notes)}" if notes else ""),
            "paper": _fmt(c.paper, 1),
            "diff": "" if pd.isna(c["diff"]) else diff.format(c["diff"]),
        }
        text.setdefault(c.row, {}).update({(name, k): v for k, v in shown.items()})
    return pd.DataFrame.from_dict(text, orient="index")


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table via tabulate: the first column left-aligned, the rest right; text as is."""
    align = ["left"] + ["right"] * (frame.shape[1] - 1)
    return frame.to_markdown(index=False, colalign=align, disable_numparse=True) + "\n"


def markdown(table: pd.DataFrame) -> str:
    """The paper's layout as a Markdown table: per distortion, ours, the paper's, the difference."""
    shown = _shown(table)
    shown.columns = [n if part == "ours" else f"{n} {part}" for n, part in shown.columns]
    return _markdown(shown.rename_axis("model").reset_index()) + "\n" + LEGEND + "\n"


def latex(table: pd.DataFrame) -> str:
    """A booktabs tabular: per distortion, ours (mean \\pm std (n)), the paper's, the difference.
    The Styler escapes the labels and the text, leaving the $...$ math alone."""
    shown = _shown(table, pm="$\\pm$", diff="${:+.2f}$").rename(columns={"diff": "$\\Delta$"})
    shown.index.name, shown.columns.names = None, ["Model", None]
    styler = shown.style.format(escape="latex-math").format_index(escape="latex", axis=0)
    styler = styler.format_index(escape="latex", axis=1, level=0)
    tex = styler.to_latex(
        column_format="l" + "rrr" * (shown.shape[1] // 3), hrules=True, multicol_align="c"
    )
    return (
        "% stnbench-report: test error (%), mean $\\pm$ std over the seeds that ended ok (n);\n"
        "% needs \\usepackage{booktabs}\n" + tex
    )


# --- learning rates -----------------------------------------------------------------------------


def lr_markdown(per_lr: pd.DataFrame, table: pd.DataFrame) -> str:
    """One table per distortion: a row per model, a column per learning rate; * marks the lr the
    main table uses (lowest mean validation error)."""
    parts = []
    for data in dict.fromkeys(table["data"]):
        sub = per_lr[per_lr["data"] == data]
        records = []
        for _, cell in table[table["data"] == data].iterrows():
            record = {"model": cell.row}
            for lr in sorted(sub.lr.unique()):
                hit = sub[(sub.row == cell.row) & (sub.lr == lr)]
                text = "" if hit.empty else cell_text(hit.iloc[0])
                record[f"lr {lr:g}"] = text + (" *" if lr == cell.lr and text else "")
            records.append(record)
        title = (
            f"{COLUMNS.get(data, data)}: test error (%), mean ± std (n) of the runs that ended ok"
        )
        parts.append(title + "\n\n" + _markdown(pd.DataFrame(records)))
    return "\n".join(parts)


def lr_plot(runs: pd.DataFrame, per_lr: pd.DataFrame, path: Path) -> None:
    """Test error against learning rate, a line per model, a panel per distortion (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    rows, cols = _order(runs)
    fig = Figure(figsize=(5 * len(cols), 4), layout="constrained")
    axes = fig.subplots(1, len(cols), squeeze=False)
    for ax, data in zip(axes[0], cols, strict=True):
        for i, row in enumerate(rows):
            line = per_lr[(per_lr["data"] == data) & (per_lr.row == row)].sort_values("lr")
            if line.empty:
                continue
            ok = line[line.n > 0]
            ax.errorbar(ok.lr, ok["mean"], ok["std"].fillna(0), color=f"C{i % 10}", marker="o",
                        capsize=3, label=row)  # fmt: skip
            bad = runs[(runs["data"] == data) & (runs.row == row)]
            bad = bad[bad.status.isin(["collapsed", "diverged"])]
            y = bad.test_error.astype(float).fillna(100.0)  # a diverged run has no test error
            ax.scatter(bad.lr, y, marker="x", color=f"C{i % 10}", zorder=3)
        title = f"{COLUMNS.get(data, data)} (x: collapsed or diverged runs)"
        ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="test error (%)",
               title=title)  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# --- the files ----------------------------------------------------------------------------------


def write(runs: pd.DataFrame, out: str | Path) -> list[Path]:
    """Write the table (csv, md, tex), every run (runs.csv), the learning curves where runs
    logged validations (stnbench.curves) and, where learning rates differ, the per-lr table and
    plot; return the paths written."""
    out, files, plots = Path(out), {}, {}
    kinds = pd.Series([tasks.name_of({"task": t}) for t in runs.get("task", [None] * len(runs))],
                      runs.index)  # fmt: skip
    classified = runs[kinds == "classify"]
    for name in sorted(set(kinds) - {"classify"}):  # another task's table (task.table)
        stem = "table" if classified.empty and kinds.nunique() == 1 else f"table_{name}"
        frame, text = tasks.get(name).table(runs[kinds == name])
        files |= {f"{stem}.csv": frame, f"{stem}.md": text}
    if not classified.empty:
        per_lr = by_lr(classified)
        table = cells(classified, per_lr)
        files |= {"table.csv": wide(table).reset_index(), "table.md": markdown(table),
                  "table.tex": latex(table)}  # fmt: skip
    files["runs.csv"] = runs.drop(columns="tabulated", errors="ignore")  # where each was read
    if not (frame := curves.read(runs)).empty:
        files["curves.csv"] = frame
        plots["curves.png"] = lambda p: curves.plot(frame, p)
    if not classified.empty and classified.lr.nunique() > 1:
        files["table_lr.csv"] = per_lr.rename(columns={"score": "val_score"})
        files["table_lr.md"] = lr_markdown(per_lr, table)
        plots["lr.png"] = lambda p: lr_plot(classified, per_lr, p)
    for name, content in files.items():
        with atomic_path(out / name) as tmp:
            if isinstance(content, str):
                tmp.write_text(content)
            else:
                content.to_csv(tmp, index=False)
    for name, plot in plots.items():
        plot(out / name)
    return [out / name for name in [*files, *plots]]
