"""Resume caches that prove themselves (firmad.robustness.resume) and attacks that continue
from their finished batches (firmad.robustness.gradient), on the toy detector of
test_attacks: a damaged, foreign or forged partial is discarded with a message and
recomputed, and what is reused gives the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save

import firmad.robustness.evaluate as ev
from firmad.errors import ConfigError
from firmad.robustness import robust_auroc_sweep
from firmad.robustness.attacks import AttackSpec, run_attack
from firmad.robustness.resume import PartialAttacks, _load, digest_tensors, settings_sha256
from tests.golden_attacks import _data

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"steps": 3, "seed": 0}
KW = dict(eps_list=[0.0, 0.02, 0.05], steps=3, n_bootstrap=20, checks=False, batch_size=7)
KEY = "eps=0.05"


@pytest.fixture(scope="module")
def toy():
    return _data()


@pytest.fixture(scope="module")
def fresh(toy):
    det, x, y = toy
    return robust_auroc_sweep(det, x, y, **KW)


class _Count:
    """Counts the gradient attacks of the sweep."""

    def __init__(self, monkeypatch):
        self.calls, self.inner = 0, ev.run_attack
        monkeypatch.setattr(ev, "run_attack", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _open(folder, notes, settings=SETTINGS):
    return PartialAttacks.open(folder / ".attack-partial", settings, notes.append, 1 << 24)


def _rewrite(path, tensors=None, meta=None, checksum=True):
    """Write ``path`` again with its tensors and metadata changed by the functions given
    (their checksum recomputed unless ``checksum`` is False)."""
    t, m = _load(path, 1 << 24)
    t = tensors(t) if tensors else t
    m = meta(dict(m)) if meta else dict(m)
    if checksum:
        m["tensors_sha256"] = digest_tensors(t)
    path.write_bytes(save(t, metadata=m))


def _no_winner(path, toy):
    _rewrite(path, tensors=lambda t: {"images": t["images"]})


def _no_settings(path, toy):
    _rewrite(path, meta=lambda m: {k: v for k, v in m.items() if k != "settings"})


def _random_bytes(path, toy):
    path.write_bytes(os.urandom(300))


def _edited_images(path, toy):
    _rewrite(path, tensors=lambda t: {**t, "images": t["images"].flip(0)}, checksum=False)


def _other_settings(path, toy):
    other = {**SETTINGS, "steps": 6}

    def meta(m):
        return {**m, "settings": json.dumps(other), "settings_sha256": settings_sha256(other)}

    _rewrite(path, meta=meta)


def _outside_the_ball(path, toy):
    _, x, _ = toy
    _rewrite(path, tensors=lambda t: {**t, "images": (x + 0.2).clamp(0, 1)})


def _a_fifo(path, toy):
    path.unlink()
    os.mkfifo(path)


CASES = {
    "random bytes": (_random_bytes, "unreadable"),
    "no winner": (_no_winner, "field(s) winner missing"),
    "no settings": (_no_settings, "it carries no settings"),
    "other settings": (_other_settings, "made with other settings (steps: 6 then, 3 now)"),
    "edited images": (_edited_images, "contents do not match their checksum"),
    "forged outside the eps-ball": (_outside_the_ball, "does not fit these images"),
    "a FIFO": (_a_fifo, "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_partial_that_does_not_prove_itself_is_recomputed(toy, fresh, tmp_path, monkeypatch,
                                                            case):  # fmt: skip
    det, x, y = toy
    notes: list[str] = []
    robust_auroc_sweep(det, x, y, cache=_open(tmp_path, notes), **KW)
    damage, message = CASES[case]
    damage(_open(tmp_path, notes)._path(KEY), toy)
    count, notes = _Count(monkeypatch), []
    again = robust_auroc_sweep(det, x, y, cache=_open(tmp_path, notes), **KW)
    assert count.calls == 1, notes  # the other attack was reused, this one recomputed
    assert any(message in n for n in notes), notes
    assert again["rows"] == fresh["rows"]
    assert again["resumed"]["reused_attacks"] == ["eps=5.1/255"]  # in the CLI's units


def test_lost_settings_file_the_partials_answer_for_themselves(toy, fresh, tmp_path, monkeypatch):
    """The issue's case: settings.json deleted, then a rerun with other settings. The partials
    carry theirs: none is reused, each is discarded with a message."""
    det, x, y = toy
    notes: list[str] = []
    old = {**SETTINGS, "steps": 6}
    robust_auroc_sweep(det, x, y, cache=_open(tmp_path, notes, old), **{**KW, "steps": 6})
    (tmp_path / ".attack-partial" / "settings.json").unlink()
    count = _Count(monkeypatch)
    again = robust_auroc_sweep(det, x, y, cache=_open(tmp_path, notes), **KW)
    assert count.calls == 2 and again["rows"] == fresh["rows"]
    assert any("its settings file is missing" in n for n in notes)
    assert sum("made with other settings (steps: 6 then, 3 now)" in n for n in notes) == 2
    with pytest.raises(ConfigError, match="other settings"):  # settings.json: refused whole
        _open(tmp_path, notes, old)


class _Memory:
    """A checkpoint in memory (`firmad.robustness.gradient.Checkpoint`)."""

    def __init__(self):
        self.state, self.saves = None, 0

    def load(self):
        return self.state

    def save(self, state):
        self.saves += 1
        self.state = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _stop_at(step: int):
    def on_step(done, total):
        if done == step:
            raise KeyboardInterrupt

    return on_step


def test_an_interrupted_attack_continues_from_its_finished_batches(toy):
    det, x, y = toy
    spec = AttackSpec(0.05, steps=3, restarts=2, schedule="apgd", batch_size=6, seed=1)
    whole = run_attack(det, x, y, spec)
    assert whole.units == 2 * 2 * 4  # exact + centre, restarts, batches of 6 of 20
    memory = _Memory()
    with pytest.raises(KeyboardInterrupt):
        run_attack(det, x, y, spec, checkpoint=memory, on_step=_stop_at(3 * 5 + 2))
    assert memory.saves == 1 and memory.state["done"] == 5
    steps = []
    again = run_attack(det, x, y, spec, checkpoint=memory, on_step=lambda d, t: steps.append(d))
    assert again.resumed == 5 and steps[0] == 3 * 5 + 1  # the kept batches are not redone
    assert torch.equal(again.images, whole.images) and torch.equal(again.scores, whole.scores)
    assert torch.equal(again.winner, whole.winner)


@pytest.mark.parametrize("damage", ["outside the ball", "wrong objective", "wrong count"])
def test_a_checkpoint_that_does_not_fit_is_recomputed(toy, damage):
    det, x, y = toy
    spec = AttackSpec(0.05, steps=2, batch_size=6, seed=1)
    whole = run_attack(det, x, y, spec)
    memory = _Memory()
    with pytest.raises(KeyboardInterrupt):
        run_attack(det, x, y, spec, checkpoint=memory, on_step=_stop_at(2 * 5 + 1))
    st = memory.state
    if damage == "outside the ball":
        st["best_x"] = (st["best_x"] + 0.3).clamp(0, 1)
    elif damage == "wrong objective":
        st["best_obj"] = st["best_obj"] + 1.0
    else:
        st["done"] = 10**6
    again = run_attack(det, x, y, spec, checkpoint=memory)
    assert again.resumed == 0 and torch.equal(again.images, whole.images)


def test_an_interrupted_square_attack_continues_from_its_finished_batches(toy):
    from firmad.robustness.attacks import run_square

    det, x, y = toy
    spec = AttackSpec(0.05, steps=12, restarts=2, batch_size=6, seed=2)
    whole = run_square(det, x, y, spec)
    memory = _Memory()
    with pytest.raises(KeyboardInterrupt):  # in the 2nd restart's 2nd batch (of 4)
        run_square(det, x, y, spec, checkpoint=memory, on_step=_stop_at(11 * 5 + 3))
    assert memory.state["done"] == 5
    again = run_square(det, x, y, spec, checkpoint=memory)
    assert again.resumed == 5 and again.units == 8
    assert torch.equal(again.images, whole.images) and torch.equal(again.scores, whole.scores)
    memory.state["best_x"] = (memory.state["best_x"] + 0.2).clamp(0, 1)  # outside the ball
    assert run_square(det, x, y, spec, checkpoint=memory).resumed == 0
