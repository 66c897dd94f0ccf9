"""Learning curves from what runs wrote: validation error against training images seen (step x
batch size) and against the training loop's wall-clock seconds, read from each run's TensorBoard
events with TensorBoard's own reader, never recomputed.

``read(runs)`` (runs as stnbench.report.collect gives them) averages them over seeds per
(protocol, data, row, lr, step), a protocol being the folder a run was found under
(stnbench-report's DIR); ``plot(frame, path)`` draws them, a line per learning rate where a row
has several. The columns and the figure: docs/sweeps.md,
"stnbench-report".
"""

import logging
from pathlib import Path

import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stnbench import legacy, tasks, tblog
from stnbench.files import atomic_path

DONE = ("ok", "collapsed", "diverged")  # runs whose curves are whole
STYLES = ("-", "--", ":", "-.")  # a line style per protocol
# TensorBoard's reader logs its file bookkeeping at INFO ("No path found after ...") and, for a
# resumed run, "Detected out of order event.step ... Purging expired events" at WARNING: the
# purge is what a resume asks for (SummaryWriter's purge_step), not the report's news
logging.getLogger("tensorboard").setLevel(logging.ERROR)


def events(folder: str | Path, tags: tuple[str, ...] = tblog.VAL_ERROR) -> pd.DataFrame:
    """One run's validations: step, val_error (the validation metric under ``tags``, newest
    first: classification's error by default) and seconds (the loop's wall time when the run
    logged ``time/seconds``, else the events' wall time since the run's first event)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    present = acc.Tags()["scalars"]
    # a run resumed across the tags' rename wrote both, the old before its resume: one curve,
    # the newest tag's value where both hold a step
    val = {e.step: e for tag in reversed(tags) if tag in present for e in acc.Scalars(tag)}
    val = [val[step] for step in sorted(val)]
    if not val:
        return pd.DataFrame(columns=["step", "val_error", "seconds"])
    if "time/seconds" in present:
        seconds = {e.step: e.value for e in acc.Scalars("time/seconds")}
    else:  # runs written before time/seconds was logged
        start = min(acc.Scalars(tag)[0].wall_time for tag in present)
        seconds = {e.step: e.wall_time - start for e in val}
    rows = [(e.step, e.value, seconds.get(e.step)) for e in val]
    return pd.DataFrame(rows, columns=["step", "val_error", "seconds"])


KEYS = ["protocol", "data", "row", "lr", "step"]  # a curve's point: runs averaged over seeds


def read(runs: pd.DataFrame) -> pd.DataFrame:
    """The curves of every finished run, averaged over seeds per (protocol, data, row, lr,
    step); n counts the runs averaged. A runs.csv's runs (stnbench.report.tabulated) bring the
    curves its folder's curves.csv holds for them (``committed``), pooled with the run folders'
    where both have a point."""
    parts = []
    done = runs.status.isin(DONE)
    if "tabulated" in runs:  # rows of a runs.csv: their folders are not read
        done &= runs.tabulated.isna()
    for run in runs[done].itertuples():
        name = tasks.get(tasks.name_of({"task": getattr(run, "task", None)})).METRIC.name
        curve = events(run.path, tblog.val_tags(name))
        if not curve.empty:
            curve = curve.assign(protocol=_protocol(run.source), data=run.data, row=run.row,
                                 lr=run.lr, seed=run.seed, metric=name)  # fmt: skip
            parts.append(curve.assign(images=curve.step * run.batch_size))
    kept, _ = committed(runs)
    if not parts and kept.empty:
        return pd.DataFrame()
    metrics = [] if kept.empty else list(kept.attrs["metrics"])
    if parts:
        frame = pd.concat(parts)
        metrics += [m for m in frame.metric.unique() if m not in metrics]
        frame = frame.groupby(KEYS, sort=False).agg(
            images=("images", "first"),
            seconds=("seconds", "mean"),
            mean=("val_error", "mean"),
            std=("val_error", "std"),
            min=("val_error", "min"),
            max=("val_error", "max"),
            n=("seed", "size"),
        )
        out = _pooled(pd.concat([k for k in (kept, frame.reset_index()) if not k.empty]))
    else:
        out = kept
    out = out.sort_values(KEYS, ignore_index=True)
    out.attrs["metric"] = ", ".join(metrics)  # the plot's axis
    return out


def _protocol(source) -> str:
    return Path(source).name if isinstance(source, str) else ""


def committed(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The curves that the runs.csv of ``runs``' tabulated rows has beside it (its folder's
    curves.csv, as read() wrote it), each (protocol, data, row, lr) kept where it averages as
    many runs as that runs.csv has finished in it here (none set aside as another's duplicate),
    and a line for each runs.csv or curve left out."""
    if "tabulated" not in runs:
        return pd.DataFrame(), []
    kept, problems, metrics = [], [], []
    tabulated = runs[runs.tabulated.notna() & runs.status.isin(DONE)]
    for csv, group in tabulated.groupby("tabulated", sort=False):
        path = Path(csv).with_name("curves.csv")
        if not path.is_file():
            continue  # a folder whose runs logged no validations: no curves to bring
        try:
            frame = pd.read_csv(path)
        except (ValueError, OSError) as e:
            problems.append(f"{path}: unreadable ({type(e).__name__}: {e}); its curves left out")
            continue
        group = group.assign(protocol=group.source.map(_protocol))
        if "lr" not in frame and {"protocol", "data", "row"} <= set(frame):
            lines = len(frame.groupby(["protocol", "data", "row"]))
            frame = legacy.curves_lr(frame, group)
            if (lost := lines - len(frame.groupby(["protocol", "data", "row"]))) > 0:
                problems.append(f"{path}: {lost} lines pool several lrs (written before lrs "
                                "were kept apart); left out")  # fmt: skip
        if missing := [k for k in (*KEYS, "images", "seconds", "mean", "n") if k not in frame]:
            problems.append(f"{path}: no {', '.join(missing)} column; its curves left out")
            continue
        finished = group.groupby(KEYS[:-1], dropna=False).size()
        averaged = frame.groupby(KEYS[:-1], dropna=False).n.max()
        whole = [key for key, n in averaged.items() if finished.get(key, 0) == n]
        for key, n in averaged.drop(whole).items():
            protocol, data, row, lr = key
            problems.append(
                f"{path}: {row} on {data} ({protocol}, lr {lr:g}) averages {n} runs, "
                f"{finished.get(key, 0)} of them here; its curve left out"
            )
        frame = frame.set_index(KEYS[:-1])
        kept.append(frame[frame.index.isin(whole)].reset_index())
        names = {tasks.get(tasks.name_of({"task": t})).METRIC.name
                 for t in group.get("task", pd.Series([None] * len(group)))}  # fmt: skip
        metrics += [m for m in sorted(names) if m not in metrics]
    if not kept:
        return pd.DataFrame(), problems
    out = pd.concat(kept, ignore_index=True)
    out.attrs["metrics"] = metrics
    return out, problems


def _pooled(frame: pd.DataFrame) -> pd.DataFrame:
    """Points that two sources hold (a committed curves.csv and the run folders) as one: n the
    sum, mean and seconds weighted by n, min and max of both, std pooled exactly (n - 1: each
    source's spread about the pooled mean)."""
    groups = frame.groupby(KEYS, sort=False, dropna=False)
    n = groups.n.transform("sum")
    mean = (frame["mean"] * frame.n).groupby([frame[k] for k in KEYS], dropna=False)
    mean = mean.transform("sum") / n
    spread = frame["std"].fillna(0) ** 2 * (frame.n - 1) + frame.n * (frame["mean"] - mean) ** 2
    frame = frame.assign(pooled_mean=mean, ss=spread, s=frame.seconds * frame.n)
    out = frame.groupby(KEYS, sort=False, dropna=False).agg(
        images=("images", "first"), s=("s", "sum"), ss=("ss", "sum"), min=("min", "min"),
        max=("max", "max"), n=("n", "sum"), parts=("n", "size"), pooled_mean=("pooled_mean",
        "first"), mean=("mean", "first"), std=("std", "first"), seconds=("seconds", "first"),
    )  # fmt: skip
    many = out.parts > 1  # elsewhere a point of one source, its values as they were
    out.loc[many, "mean"] = out.pooled_mean[many]
    out.loc[many, "seconds"] = out.s[many] / out.n[many]
    out.loc[many, "std"] = (out.ss[many] / (out.n[many] - 1)) ** 0.5
    columns = ["images", "seconds", "mean", "std", "min", "max", "n"]
    return out[columns].reset_index()


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Validation error against images seen and against seconds, a panel row per distortion."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    datas, rows = list(dict.fromkeys(frame["data"])), list(dict.fromkeys(frame.row))
    protocols = list(dict.fromkeys(frame.protocol))
    fig = Figure(figsize=(12, 4 * len(datas)), layout="constrained")
    axes = fig.subplots(len(datas), 2, squeeze=False)
    lrs = frame.groupby(["data", "row"]).lr.transform("nunique")
    for (data, row, protocol, lr), line in frame.groupby(
        ["data", "row", "protocol", "lr"], sort=False
    ):
        color = f"C{rows.index(row) % 10}"
        style = STYLES[protocols.index(protocol) % len(STYLES)]
        label = row if len(protocols) == 1 else f"{row}, {protocol}"
        label += f", lr {lr:g}" if lrs[line.index[0]] > 1 else ""
        for ax, x in zip(axes[datas.index(data)], ("images", "seconds"), strict=True):
            ax.plot(line[x], line["mean"], style, color=color, label=label)
            ax.fill_between(line[x], line["min"], line["max"], color=color, alpha=0.15)
    xlabels = ("training images seen", "training wall-clock seconds")
    for data, pair in zip(datas, axes, strict=True):
        for ax, x in zip(pair, xlabels, strict=True):
            metric = frame.attrs.get("metric") or "error"
            ax.set(xlabel=x, ylabel=f"validation {metric} (%)", title=data,
                   yscale="log" if metric == "error" else "linear")  # fmt: skip
            ax.grid(True, which="both", alpha=0.3)
        pair[0].legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
