"""What each center contributed: leave-one-out over the recorded per-round updates, and
FED/contribution.json from a real federation in which one center's labels are shuffled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medfound.errors import MedfoundError
from medfound.fed.contribution import LeaveOneOut, without_name
from medfound.fed.settings import FedSettings


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "bn.running_var": rng.uniform(0.5, 2, size=4).astype(np.float32)}


def _mean(updates: dict[str, tuple[float, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    total = sum(n for n, _ in updates.values())
    return {k: sum(n * w[k].astype(np.float64) for n, w in updates.values()) / total
            for k in next(iter(updates.values()))[1]}


def test_one_round_left_out_is_exactly_the_fedavg_of_the_others() -> None:
    rng = np.random.default_rng(0)
    start = _weights(rng)
    updates = {c: (float(n), _weights(rng)) for c, n in (("a", 3), ("b", 5), ("c", 2))}
    loo = LeaveOneOut()
    loo.add_round(1, {c: n for c, (n, _) in updates.items()}, lambda c: updates[c][1], start)
    final = {k: v.astype(np.float32) for k, v in _mean(updates).items()}
    models = loo.models(final)
    assert sorted(models) == [without_name(c) for c in "abc"]
    for c in "abc":
        others = _mean({k: v for k, v in updates.items() if k != c})
        for k in final:
            np.testing.assert_allclose(models[without_name(c)][k], others[k], rtol=0, atol=1e-5)


def test_shares_add_up_over_rounds_and_survive_a_checkpoint() -> None:
    rng = np.random.default_rng(1)
    model, loo, expected = _weights(rng), LeaveOneOut(), {"a": 0.0, "b": 0.0}
    for rnd in (1, 2, 3):
        ups = {c: (float(n), _weights(rng)) for c, n in (("a", 1), ("b", 3))}
        if rnd == 2:
            ups = {"a": ups["a"]}  # b's update was rejected this round: a was alone
        loo.add_round(rnd, {c: n for c, (n, _) in ups.items()}, lambda c, u=ups: u[c][1], model)
        new = _mean(ups)
        for c, (n, w) in ups.items():
            total = sum(m for m, _ in ups.values())
            expected[c] = expected[c] + (n / (total - n) * (w["conv.weight"] - new["conv.weight"])
                                         if total > n else new["conv.weight"] - model["conv.weight"])
        model = {k: v.astype(np.float32) for k, v in new.items()}
    restored = LeaveOneOut()
    restored.restore(loo.state())
    assert restored.rounds == {"a": [1, 2, 3], "b": [1, 3]}
    for c in "ab":
        got = model["conv.weight"] - restored.models(model)[without_name(c)]["conv.weight"]
        np.testing.assert_allclose(got, expected[c], atol=1e-5)


def test_contribution_needs_the_centers_agreement_to_see_each_others_updates() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "configs" /
                                                "federate.yaml"))
    cfg["fed"]["centers"] = ["center_0", "center_1"]
    cfg["fed"]["strategy"] = {"name": "fedavg"}
    cfg["fed"]["contribution"] = True
    with pytest.raises(MedfoundError, match="share_local_models=true"):
        FedSettings.from_config(cfg)
    cfg["fed"]["share_local_models"] = True
    assert FedSettings.from_config(cfg).contribution


def _scramble_labels(center: Path, seed: int = 0) -> None:
    """Move every training nodule of `center` to a random place in its scan (its sizes
    kept): the center trains on labels that mark no nodule, and leaves its real nodules
    unlabeled."""
    from medfound.io.reader import read_volume

    rng = np.random.default_rng(seed)
    path = center / "datalist.json"
    datalist = json.loads(path.read_text())
    for item in datalist["training"]:
        volume = read_volume(center / item["image"])
        shape = np.array(volume.array.shape)
        boxes = []
        for box in item["box"]:
            ijk = rng.uniform(0.25, 0.75, size=3) * (shape - 1)
            boxes.append([*map(float, (volume.affine @ np.r_[ijk, 1.0])[:3]), *box[3:]])
        item["box"] = boxes
    path.write_text(json.dumps(datalist))


@pytest.mark.long
def test_the_center_with_scrambled_labels_contributes_least(tmp_path: Path) -> None:
    from medfound.data.phantoms import make_phantoms

    root = tmp_path / "phantoms"
    make_phantoms(root, centers=3, cases=8, seed=5, size="small", progress=False)
    _scramble_labels(root / "center_1")
    out = tmp_path / "FED"
    res = subprocess.run(
        [sys.executable, "-m", "medfound", "run", "federate", "fed.mode=simulation",
         "fed.centers=[center_0,center_1,center_2]", "experiment=phantoms_smoke",
         "trainer.progress=false", "data.num_patches_per_image=2", "fed.eval_bootstraps=10",
         "network.sw_roi_size=[144,144,96]", f"data.root={root}", "fed.rounds=3",
         "fed.local_epochs=3", "fed.contribution=true", "fed.share_local_models=true",
         f"out_dir={out}"], capture_output=True, text=True, check=False, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    doc = json.loads((out / "contribution.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert doc["method"]["name"] == "leave-one-out over the recorded per-round updates"
    assert doc["method"]["cost"]["evaluations"] == 4 * 3
    assert (out / "contribution.png").stat().st_size > 0
    # Every center scored every leave-one-out model (the detection loss too).
    cross = metrics["cross_site"]["models"]
    for center in ("center_0", "center_1", "center_2"):
        row = cross[without_name(center)]
        assert sorted(row) == ["center_0", "center_1", "center_2"]
        assert all("loss" in m for c, m in row.items() if m["n_nodules"] > 0)
        per = doc["centers"][center]
        assert per["rounds"] == [1, 2, 3] and per["accepted_updates"] == 3
        assert per["bytes"] == metrics["bytes_per_center"][center]
        assert metrics["privacy"]["flows"][center]["received"]["leave_one_out_of"] == [
            "center_0", "center_1", "center_2"]
    effects = {c: doc["centers"][c]["effect"]["loss"] for c in doc["centers"]}
    assert doc["lowest"]["loss"] == "center_1", effects
    assert effects["center_1"] == min(effects.values())
