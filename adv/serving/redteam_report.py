"""The red team's report: one table row per attacker (``jobs.redteam``), and the serve report's figure."""

from __future__ import annotations

from pathlib import Path

from adv.evaluate.stats import pct
from adv.serving.redteam import NO_BUNDLE


def _pct(v: float | None) -> str:
    if v is None:
        return "not measured (no --bundle)"
    return pct(v, 0, missing="n/a (none classified correctly)")


def markdown(rows: list[dict]) -> str:
    """The rows as a table; a column for success as answered by the endpoint when a row has it (no --bundle)."""
    answered = any("success_as_answered" in r for r in rows)
    extra = ("success as answered by the endpoint | ", "---|") if answered else ("", "")
    lines = ["| attack | endpoint output | oracle | accounts | threat model "
             "| success via endpoint (true, on the model) | "
             f"{extra[0]}success in-process | mean queries (endpoint / in-process) | flagged at query | "
             "accounts flagged (used) |", "|---|---|---|---|---|---|" + extra[1] + "---|---|---|---|"]
    for r in rows:
        flagged = "never" if r["flagged_at_query"] is None else str(r["flagged_at_query"])
        free = r["mean_queries_in_process"]
        as_answered = (_pct(r["success_as_answered"]) if "success_as_answered" in r else "not asked") + " | "
        lines.append(f"| {r['attack']} | {r['output']} | {r['oracle']} | {r['accounts']} | {r['threat_model']} | "
                     f"{_pct(r['success_endpoint'])} | {as_answered if answered else ''}"
                     f"{_pct(r['success_in_process']) if free is not None else NO_BUNDLE} | "
                     f"{r['mean_queries']:.0f} / {'not run' if free is None else f'{free:.0f}'} | {flagged} | "
                     f"{r['accounts_flagged']}/{r['accounts']} (used {r.get('accounts_used', r['accounts'])}) |")
    if answered:
        judged = next(r for r in rows if "judged_by" in r)
        lines += ["", f"Success as answered by the endpoint: {judged['judged_by']} ({judged['judge_queries']} "
                  "queries besides the attack's). A detector action (deceive, block) can change those answers: "
                  f"this is what the attacker is told, not necessarily the truth. The in-process comparison: "
                  f"{NO_BUNDLE}."]
    return "\n".join(lines) + "\n"


def plot_story(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [f"{r['attack']}\n{r['output']}, {r['accounts']} acc" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    i = np.arange(len(rows))
    a.bar(i - 0.2, [r["success_endpoint"] for r in rows], 0.4, label="through the endpoint")
    a.bar(i + 0.2, [r["success_in_process"] for r in rows], 0.4, color="gray", label="in-process, no detector")
    a.set_xticks(i, names, fontsize=7)
    a.set_ylim(0, 1.05)
    a.set_ylabel("attack success (true, on the model)")
    a.legend(fontsize=8)
    b.bar(i, [r["queries"] for r in rows], 0.6, color="lightgray", label="queries sent")
    flagged = [(j, r["flagged_at_query"]) for j, r in enumerate(rows) if r["flagged_at_query"] is not None]
    if flagged:
        b.plot(*zip(*flagged), "rv", ms=9, label="first flagged at query")
    b.set_xticks(i, names, fontsize=7)
    b.set_ylabel("queries (all attacked images)")
    b.legend(fontsize=8)
    fig.suptitle("Red team against the served bundle", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
