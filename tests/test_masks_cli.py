"""`python -m smartclip_jax.masks`: a SmartCLIP model's masks for given captions, as a heatmap
and a table; a model without a mask network is refused."""

import numpy as np
import pytest

from smartclip_jax import config as config_lib, losses, masks
from tests.conftest import DEMO, TINY
from tests.test_checkpoint import save_steps

CAPTIONS = ["a red circle.", "a blue square at the top left.", "a green | yellow triangle."]


def test_masks_command_writes_a_heatmap_and_a_table(tmp_path, capsys):
  smart = tmp_path / "smart"
  save_steps(config_lib.load(DEMO, TINY), smart / "checkpoints", [1])
  masks.main(["--model", str(smart), "--captions", *CAPTIONS, "--out", str(tmp_path / "out")])
  printed = capsys.readouterr().out
  assert (tmp_path / "out" / "masks.png").stat().st_size > 0
  table = (tmp_path / "out" / "masks.md").read_text()
  assert table.split("\n", 2)[2].strip() in printed  # the table under the title, as printed
  rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
  assert [r.split(" | ")[1] for r in rows] == [c.replace("|", "\\|") for c in CAPTIONS]

  want = np.load(tmp_path / "out" / "masks.npy")
  assert want.shape == (3, 64) and set(np.unique(want)) <= {0.0, 1.0}  # hard masks
  on = want >= 0.5
  pairs = [
    (on[i] & on[j]).sum() / max((on[i] | on[j]).sum(), 1) for i, j in ((0, 1), (0, 2), (1, 2))
  ]
  assert f"mean pairwise Jaccard {np.mean(pairs):.3f} over 3 captions" in printed
  assert f"always on {on.all(0).sum()}, never on {(~on.any(0)).sum()} of 64" in printed
  assert [r.split(" | ")[2] for r in rows] == [f"{n} of 64" for n in on.sum(1)]
  assert float(losses.mean_pairwise(losses.mask_jaccard(want))) == pytest.approx(np.mean(pairs))


def test_masks_command_refuses_a_model_without_a_mask_network(tmp_path):
  torch = pytest.importorskip("torch")
  from tests.torch_reference import ReferenceCLIP

  torch.save(ReferenceCLIP(image_size=32, mask_net=False).state_dict(), tmp_path / "clip.pt")
  (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n\n")
  argv = ["--model", str(tmp_path / "clip.pt"), "--captions_file", str(tmp_path / "captions.txt")]
  with pytest.raises(SystemExit, match="is not a SmartCLIP model: it has no mask network"):
    masks.main([*argv, "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()
