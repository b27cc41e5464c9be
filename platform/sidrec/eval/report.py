"""The evaluation report: the Markdown table of HR/NDCG@K per model, and a bar chart."""

from __future__ import annotations

import io

import numpy as np

from sidrec.config import METRIC_KS as KS


def models_table(models: dict[str, dict]) -> str:
    """A Markdown table: one row per model, HR/NDCG at 1, 5, 10."""
    cols = [f"{m}@{k}" for k in KS for m in ("hr", "ndcg")]
    lines = ["| model | " + " | ".join(c.upper().replace("@", "@") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, metrics in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """The Markdown table of a report: one row per model, HR/NDCG at 1, 5, 10."""
    return models_table(report["models"])


def format_cold_start(report: dict) -> str:
    """The cold-start part of a report (eval.cold_start): a table per slice, cold targets then warm; "" without."""
    slices, items = report.get("cold_start"), report.get("cold_items") or {}
    if not slices:
        return ""
    out = [f"## Cold start: {items.get('items')} items held out of training ({items.get('by')}, share "
           f"{items.get('share')}); their SIDs from the stored encoder and quantizer, as an admin add "
           f"({items.get('sids_exact')} the quantizer's own codes, {items.get('sids_nearest_free')} the nearest "
           f"free ones). {items.get('examples_with_cold_history')} examples have a cold item in the history."]
    if "new_item_slots" in items:
        ranking = f", ranked by {items['new_item_ranking']}" if "new_item_ranking" in items else ""
        out[0] += (f" SID-LLM: {items['new_item_slots']} of the top-10 places reserved for added items{ranking}; "
                   f"top-10 places held by cold items: {items.get('cold_places')}.")
    for name, entry in slices.items():
        models = {k: v for k, v in entry.items() if isinstance(v, dict)}
        out.append(f"### {name}: {entry.get('examples')} examples")
        out.append(models_table(models) if models else "(no example)")
    return "\n\n".join(out)


def format_personalization(report: dict) -> str:
    """One line: each model's personalization (``sidrec.eval.metrics.personalization``); "" without."""
    values = {k: v for k, v in (report.get("personalization") or {}).items() if v is not None}
    if not values:
        return ""
    return ("Personalization (1 - the mean share of top-10 items two test users' lists have in common; 0 = one "
            "list for everyone): " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()) + ".")


def markdown(report: dict) -> str:
    head = (f"# {report['name']}: {report['split']} ({report['examples']} examples, full ranking over "
            f"{report['catalog_items']} items)\n\nTrained on: {report['training_data']}. SID-LLM decoding: beam "
            f"{report['decode']['num_beams']}, {report['decode']['scoring']} scores, exclude_history="
            f"{report['decode']['exclude_history']}.\n\n")
    tail = ""
    if report.get("unconstrained_invalid_share") is not None:
        tail = (f"\n\nUnconstrained beam search (no trie), {report['unconstrained_examples']} examples: "
                f"{report['unconstrained_invalid_share']:.1%} of the top-10 outputs are not real items.\n")
    if pers := format_personalization(report):
        tail += f"\n\n{pers}\n"
    cold = format_cold_start(report)
    return head + format_table(report) + tail + (f"\n{cold}\n" if cold else "") + "\n"


def chart_png(report: dict) -> bytes:
    """Grouped bar chart: one group per metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [f"{m}@{k}" for m in ("hr", "ndcg") for k in KS]
    models = list(report["models"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(metrics))
    for i, name in enumerate(models):
        ax.bar(x + i * width - 0.4 + width / 2, [report["models"][name][m] for m in metrics], width, label=name)
    ax.set_xticks(x, [m.upper() for m in metrics])
    ax.set_title(f"{report['name']} — {report['split']} ({report['examples']} examples)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


