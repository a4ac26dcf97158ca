"""The "Training-time defenses" section of docs/benchmarks.md and its figure, from the stored results."""

from __future__ import annotations

import json
from pathlib import Path

from adv.evaluate.stats import pct
from adv.evaluate.tables import markdown_table
from bench.docs import markers, write_section
from bench.training_defenses_grid import BUDGET, COLUMNS, EPS, PAPER, PAPER_BUDGET, ROWS

BEGIN, END = markers("training_defenses")
HEADER = ["Clean", "FGSM", "PGD-10", "PGD-20", "PGD-40", "PGD-100", "CW-10", "CW-20", "CW-40", "CW-100"]


def _read(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def _cell(c: dict | None, ci: bool = True) -> str:
    if not c:
        return "–"
    lo, hi = c["ci"]
    return pct(c["acc"], sign=False) + (f" <sub>{pct(lo, sign=False)}–{pct(hi, sign=False)}</sub>" if ci else "")


def _clean_cell(cells: dict) -> dict | None:
    from adv.metrics import wilson_interval

    first = next(iter(cells.values()), None)
    if first is None:
        return None
    k = round(first["clean"] * first["n"])
    return {"acc": first["clean"], "ci": list(wilson_interval(k, first["n"]))}


def _suite(cells: dict) -> str:
    st = cells.get("standard")
    if not st:
        return "–"
    same = st.get("pgd100_same_images")
    return _cell(st) + (f" (first {st['n']} images; PGD-100 on them: {100 * same:.1f})" if same is not None else "")


def table(data: dict[str, dict]) -> list[str]:
    rows = []
    for row, (label, _) in ROWS.items():
        cells = data.get(row, {}).get("cells", {})
        ours = [_cell(_clean_cell(cells))] + [_cell(cells.get(c)) for c in COLUMNS]
        flags = sorted({f for c in cells.values() for f in c.get("flags", [])})
        status = "" if len(cells) >= len(COLUMNS) else (" (training)" if not cells else " (partial)")
        rows.append([f"**{label}**{status}", "ours", *ours, _suite(cells), ", ".join(flags) or "none"])
        if row in PAPER:
            rows.append(["", "paper", *(f"{v:.2f}" for v in PAPER[row]), "–", "–"])
    return markdown_table(["defense", "", *HEADER, "standard suite", "flags"], rows)


def figure(data: dict[str, dict], path: Path) -> bool:
    """Left: the single-attack columns on all scored images, beside the paper's PGD-40. Right: the standard
    suite against PGD-100 on the same first images, since the two panels are scored on different images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if data.get(r, {}).get("cells")]
    if len(rows) < 2:  # one row (RAW at 0%) says nothing a figure could add to the table
        return False
    suite_rows = [r for r in rows if "standard" in data[r]["cells"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=[len(rows), max(len(suite_rows), 1)])
    width = _bars(ax, rows, {c: [100 * data[r]["cells"].get(c, {}).get("acc", float("nan")) for r in rows]
                             for c in ("pgd40", "pgd100", "cw100")})
    for i, r in enumerate(rows):
        if r in PAPER:  # across the row's three bars
            ax.plot([i - width / 2, i + 2.5 * width], [PAPER[r][4]] * 2, "k--", lw=1)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(f"each attack alone, first {data[rows[0]]['cells']['pgd40']['n']} test images\n"
                 "dashed: the paper's PGD-40 (Wu et al. 2022, Table 6)", fontsize=9)
    if suite_rows:
        cells = [data[r]["cells"]["standard"] for r in suite_rows]
        _bars(bx, suite_rows, {"pgd100": [100 * c["pgd100_same_images"] for c in cells],
                               "standard suite": [100 * c["acc"] for c in cells]})
        bx.set_title(f"worst case, first {cells[0]['n']} test images", fontsize=9)
    fig.suptitle(f"MNIST lenet, eps={EPS}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(ax, rows: list[str], series: dict[str, list[float]]) -> float:
    """Grouped bars, one group per row; returns the bar width."""
    width = 0.8 / len(series)
    for j, (name, vals) in enumerate(series.items()):
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=name)
    ax.set_xticks([i + (len(series) - 1) * width / 2 for i in range(len(rows))],
                  [ROWS[r][0].replace(", ", ",\n").replace(" + ", "\n+ ") for r in rows], fontsize=8)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower left")
    return width


def extras(data: dict[str, dict]) -> list[str]:
    out = []
    pub = data.get("published")
    if pub and "pgd100" in pub:
        st = pub.get("standard")
        suite = (f"standard suite {_cell(st)}% on the first {st['n']} (PGD-100 on those: "
                 f"{100 * st['pgd100_same_images']:.1f}%); per attack: "
                 + ", ".join(f"after {a['label']} {100 * a['after']:.1f}%" for a in st["attacks"])
                 if st else "standard suite not finished in this run")
        out += ["### Reference: a published Madry-trained LeNet5", "",
                f"{pub['model']}: PGD-40 {_cell(pub['pgd40'])}%, PGD-100 {_cell(pub['pgd100'])}% on the first "
                f"{pub['pgd40']['n']} test images; {suite}.", ""]
    ft = data.get("finetune")
    if ft and "known_after" in ft:
        out += ["### Fine-tuning on known adversarials (Echeberria-Barrio et al. §4.1)", "",
                f"RAW fine-tuned 1 epoch on 10k training images plus {ft['n_known']} known PGD-10 adversarials "
                f"(ε = {EPS}, crafted on RAW from other training images): known adversarials classified correctly "
                f"**{100 * ft['known_before']:.1f}% → {100 * ft['known_after']:.1f}%** (paper: 92.0%). Fresh PGD-10 "
                f"adversarials crafted against each model, first test images: RAW "
                f"{_cell(ft.get('fresh_raw'))}%, fine-tuned {_cell(ft.get('fresh_tuned'))}%.", "",
                f"`{ft['command']}`", ""]
    en = data.get("ensemble")
    if en and "fgsm" in en:
        sweep = ", ".join(f"ε={e}: {100 * c['acc']:.1f}%" for e, c in en["raw_fgsm"].items())
        at = en["raw_fgsm"][str(en["eps"])]
        choice = (f"the smallest ε that does so here is **ε = {en['eps']}**" if at["acc"] <= 0.106 * at["clean"]
                  else f"no swept ε collapses MNIST that far, so the largest, **ε = {en['eps']}** "
                       f"({100 * at['acc']:.1f}% left), is used")
        out += ["### Multi-model adversarial training (Himbitski et al.; Tramèr et al. 2018)", "",
                f"Undefended lenet under FGSM: {sweep}. The paper's collapse (94.65% → 9.98% on histology at "
                f"ε = 0.01) leaves about a tenth of the clean accuracy; {choice}. Trained 2 epochs with FGSM "
                f"adversarials alternating between the model itself, RAW and advertorch's clean LeNet5: FGSM "
                f"{_cell(en['fgsm'])}%, PGD-40 {_cell(en.get('pgd40'))}% (paper: 94.1% under FGSM).", ""]
        if en.get("pgd40") and en["pgd40"]["acc"] < 0.5 * en["fgsm"]["acc"]:
            out += ["**The FGSM figure agrees with the paper's, but it is not robustness.** At the same ε an "
                    "iterative attack (PGD-40) still breaks the model: training on single-step adversarials "
                    "teaches the model to defeat that one attack, a known failure of single-step adversarial "
                    "training (Tramèr et al. 2018; Wong et al. 2020 need a random start to avoid it). The paper "
                    "reports FGSM only, which is why its number and ours agree while the model is not robust.", ""]
        out += [f"`{en['command']}`", ""]
    out += _subsets(data)
    se = {k: v for k, v in data.get("sensitivity", {}).items()}
    if se:
        out += ["### α/β sensitivity (Wu et al. Fig. 8; their figure is CIFAR-10, this is MNIST)", "",
                "Madry + AAD at a reduced budget (10k training images, 2 epochs, PGD-7); PGD-40 accuracy:", "",
                *markdown_table(["α, β", "clean (test)", "PGD-40"],
                                [[k, f"{100 * (v.get('test_acc') or 0):.1f}", _cell(v["pgd40"])]
                                 for k, v in se.items()]), ""]
    return out


def _subsets(data: dict[str, dict]) -> list[str]:
    sub = data.get("subsets", {})
    names = list(dict.fromkeys(k.split("/")[0] for k in sub))
    if not names:
        return []
    out = ["### What else moves PGD-40: the images and the step", "",
           f"PGD-40 at ε = {EPS} on the strongest Madry models. The table above uses the first 1000 test images "
           "and our step (2.5·ε/k from a random start); the paper states neither its test images nor its step.", ""]
    rows = []
    for name in names:
        first = data.get(name, {}).get("cells", data.get(name, {})).get("pgd40")  # a row's cell, or published's
        label = ROWS[name][0] if name in ROWS else "published Madry LeNet5 (advertorch)"
        paper = f"{PAPER[name][4]:.2f}" if name in PAPER else "–"
        rows.append([label, _cell(first), *(_cell(sub.get(name + k)) for k in ("/step_0.01", "/all", "/all_step_0.01")),
                     paper])
    return out + markdown_table(["model", "first 1000, our step (the table)", "first 1000, step 0.01",
                                 "all 10,000, our step", "all 10,000, step 0.01", "paper"], rows) + [""]


def _suite_n(rows: dict) -> int:
    """How many images the standard-suite cells were scored on (the first row that has one)."""
    return next((d["cells"]["standard"]["n"] for d in rows.values() if "standard" in d.get("cells", {})), 200)


def write_docs(docs: Path, results: Path, command: str, note: str = "") -> None:
    data = _read(results)
    has_fig = figure(data, docs / "benchmarks_training_defenses.png")
    rows = {r: d for r, d in data.items() if r in ROWS}
    missing = [ROWS[r][0] for r in ROWS if len(rows.get(r, {}).get("cells", {})) < len(COLUMNS)]
    lines = [BEGIN, "## Training-time defenses (Wu et al. 2022, Table 6, MNIST)", "",
             f"`lenet` (Madry et al.'s MNIST CNN) at ε = {EPS}, scored on the first "
             f"{next(iter(rows.values()), {}).get('cells', {}).get('pgd40', {}).get('n', 1000)} MNIST test images. "
             "Each attack column runs alone (accuracy in %, 95% Wilson interval below); PGD-k uses a random start "
             "and step 2.5·ε/k, CW-k is PGD-k on the CW margin loss. The standard suite is AutoAttack's "
             "(APGD-CE, APGD-T, FAB-T, Square-5000, worst case).", "",
             f"**Budget (CPU, 2 shared cores):** 3 epochs on the full 60k training images, batch 100, Adam lr "
             f"1e-3, adversarials from PGD-7 (step 0.05) with ε ramped from 0 over the first epoch "
             f"(`{BUDGET}`); the paper trains 5 epochs with PGD-40. AAD uses α = β = 0.01 (the paper's best), "
             "ALP λ = 0.5 with a 50/50 clean/adversarial mix, TRADES β = 6. The \"Madry, 5 epochs\" row trains "
             "the Madry row on for two more epochs (the paper's epoch count, still PGD-7); \"Madry, cosine lr\" "
             "is the Madry row's 3 epochs with the learning rate annealed from 1e-3 to 0 (`--schedule cosine`); "
             f"\"Madry, PGD-40, 5 epochs\" trains with the paper's attack for its 5 epochs (`{PAPER_BUDGET}`, "
             "our ε ramp kept) on CPU, since no GPU was available. "
             f"The standard suite runs on the first {_suite_n(rows)} images (Square's 5000 queries per standing "
             "image cost about 10 CPU-minutes per 200), with PGD-100 on the same images beside it.", ""]
    lines += table(data) + [""]
    if missing:
        lines += [f"Rows not finished in this run: {', '.join(missing)}. Training and scoring resume where they "
                  "stopped: rerun the bench (all rows, or `--rows NAME`).", ""]
    if note:
        lines += [note, ""]
    if has_fig:
        lines += ["![training defenses](benchmarks_training_defenses.png)", ""]
    lines += ["Commands (each row's `adv train`, then the bench scores it):", ""]
    lines += [f"- {d['label']}: `{d['command']}`" for r, d in rows.items() if "command" in d]
    lines += ["", *extras(data), f"Full run: `.venv/bin/python -m bench.training_defenses`; this section was "
              f"written by `{command}`.", "", END]
    write_section(docs / "benchmarks.md", "\n".join(lines), "training_defenses")
