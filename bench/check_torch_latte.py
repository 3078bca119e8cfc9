"""Check bench/torch_latte.py against the original Latte's oracle outputs (run by the bench's venv).

    /work/torchenv/bin/python bench/check_torch_latte.py      # exit 0 and "ok" lines when equal

Loads ../shared/reference/oracle/latte_tiny_{uncond,class}.pt into the torch model and compares the
output with the npz's `out` (and the patch embedding and timestep embedding intermediates), at
float32 tolerance scaled by the values. The benches trust their torch Latte peer only after this.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_latte import Latte, load_state  # noqa: E402

ORACLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "oracle"
TINY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, mlp_ratio=4,
            num_frames=4, learn_sigma=True)


def check(name, num_classes):
    ref = np.load(ORACLE / f"latte_tiny_{name}.npz")
    model = load_state(Latte(num_classes=num_classes, **TINY), ORACLE / f"latte_tiny_{name}.pt").eval()
    x, t = torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"])
    y = torch.from_numpy(ref["y"]) if "y" in ref else None
    with torch.no_grad():
        out = model(x, t, y).numpy()
        embed = model.x_embedder(x.reshape(-1, *x.shape[2:])).numpy()
        t_emb = model.t_embedder(t).numpy()
    worst = 0.0
    for what, got, want in (("out", out, ref["out"]), ("x_embed_noPos", embed, ref["x_embed_noPos"]),
                            ("t_emb", t_emb, ref["t_emb"])):
        err = float(np.abs(got - want).max() / np.abs(want).max())
        worst = max(worst, err)
        print(f"latte_tiny_{name} {what}: max |diff| / max |ref| = {err:.1e}")
    return worst


def main():
    worst = max(check("uncond", 0), check("class", 5))
    if worst > 1e-5:
        print(f"torch Latte does NOT match the oracle (worst {worst:.1e} > 1e-5)")
        return 1
    print(f"ok: torch Latte matches the original's oracle outputs (worst {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
