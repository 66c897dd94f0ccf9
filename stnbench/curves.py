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

from stnbench import tasks, tblog
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


def read(runs: pd.DataFrame) -> pd.DataFrame:
    """The curves of every finished run, averaged over seeds per (protocol, data, row, lr,
    step); n counts the runs averaged."""
    parts = []
    done = runs.status.isin(DONE)
    if "tabulated" in runs:  # rows of a runs.csv: their folders are not read (stnbench.report)
        done &= runs.tabulated.isna()
    for run in runs[done].itertuples():
        name = tasks.get(tasks.name_of({"task": getattr(run, "task", None)})).METRIC.name
        curve = events(run.path, tblog.val_tags(name))
        if not curve.empty:
            protocol = Path(run.source).name if isinstance(run.source, str) else ""
            curve = curve.assign(protocol=protocol, data=run.data, row=run.row, lr=run.lr,
                                 seed=run.seed, metric=name)  # fmt: skip
            parts.append(curve.assign(images=curve.step * run.batch_size))
    if not parts:
        return pd.DataFrame()
    keys = ["protocol", "data", "row", "lr", "step"]
    frame = pd.concat(parts)
    metrics = frame.metric.unique()
    frame = frame.groupby(keys, sort=False)
    out = frame.agg(
        images=("images", "first"),
        seconds=("seconds", "mean"),
        mean=("val_error", "mean"),
        std=("val_error", "std"),
        min=("val_error", "min"),
        max=("val_error", "max"),
        n=("seed", "size"),
    )
    out = out.reset_index().sort_values(keys, ignore_index=True)
    out.attrs["metric"] = ", ".join(metrics)  # the plot's axis
    return out


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
