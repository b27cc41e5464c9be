"""``loss_curve.png`` of a fine-tuning run: train loss, validation loss and the per-epoch HR@10."""

from __future__ import annotations

import io

from sidrec.config import TOP_K


def loss_curve_png(history: list[dict], log_entries: list[dict], val_loss_before: float | None) -> bytes:
    """PNG bytes: the loss log per optimizer step, validation loss per epoch (step 0: before training) and,
    on a second axis, HR@10 when the epochs have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if log_entries:
        ax.plot([e["step"] for e in log_entries], [e["loss"] for e in log_entries], label="train loss",
                color="tab:blue", alpha=0.8)
    vx = ([0] if val_loss_before is not None else []) + [h["step"] for h in history]
    vy = ([val_loss_before] if val_loss_before is not None else []) + [h["val_loss"] for h in history]
    if vx:
        ax.plot(vx, vy, "o-", label="validation loss (next item)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    hr = f"hr@{TOP_K}"
    if history and any(hr in h for h in history):
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in history], [h.get(hr, float("nan")) for h in history], "s--",
                 color="tab:green", label=f"HR@{TOP_K}")
        ax2.set_ylabel(f"HR@{TOP_K}")
        ax2.legend(loc="center right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
