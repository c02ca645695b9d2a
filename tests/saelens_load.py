"""Run by tests/test_export.py with an interpreter that has ``sae-lens`` (never the project's):
load a saepipe export in SAELens itself and encode activations with it.

    PEER_PYTHON tests/saelens_load.py EXPORT_DIR X.npy OUT.npz [EXPORT_DIR X.npy OUT.npz ...]

For each triple writes ``features`` (SAELens's ``encode``), ``reconstruction`` (``decode`` of
them) and the loaded SAE's class, architecture and hook name. Imports only sae_lens, torch and
numpy; exits with status 3 when they are not importable (the test then skips).
"""

from __future__ import annotations

import json
import sys

import numpy as np

try:
    import torch
    from sae_lens import SAE
except ImportError as err:
    print(f"sae_lens is not importable: {err}", file=sys.stderr)
    raise SystemExit(3) from err


def run(export_dir: str, x_path: str, out_path: str) -> None:
    sae = SAE.load_from_disk(export_dir, device="cpu")
    x = torch.from_numpy(np.load(x_path))
    with torch.no_grad():
        features = sae.encode(x)
        reconstruction = sae.decode(features)
    info = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(), "hook_name": sae.cfg.metadata.hook_name,
            "k": sae.cfg.k, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae}
    np.savez(out_path, features=features.numpy(), reconstruction=reconstruction.numpy(), info=json.dumps(info))


if __name__ == "__main__":
    args = sys.argv[1:]
    for i in range(0, len(args), 3):
        run(*args[i : i + 3])
