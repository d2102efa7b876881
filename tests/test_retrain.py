"""The auto retrain policy: each change follows the evidence, and no evidence ends the round."""

from __future__ import annotations

from flows.retrain import Evidence, choose_retrain, evidence_from

FAIL = (False, -0.05, -1.5)


def evidence(**changes) -> Evidence:
    base = {
        "family": "cgan",
        "steps": 1500,
        "evaluations": 6,
        "best_step": 1000,  # the curve turned before the end
        "last_eval_step": 1500,
        "stopped_early": False,
        "d_real_sign": 0.3,
        "diffaug": False,
        "key": FAIL,
        "bakeoff": (),
    }
    return Evidence(**{**base, **changes})


def choose(ev: Evidence, run=("cgan",)):
    return choose_retrain(ev, list(run), max_steps=6000, overfit_sign=0.6)


def test_a_curve_still_improving_at_the_end_trains_longer_up_to_the_cap():
    choice = choose(evidence(best_step=1500))
    assert choice.overrides == {"train": {"steps": 3000}}
    assert "still improving" in choice.reason
    assert choose(evidence(steps=3000, best_step=3000, last_eval_step=3000)).overrides == {
        "train": {"steps": 6000}
    }
    assert choose(evidence(steps=4000, best_step=4000, last_eval_step=4000)) is None


def test_no_trend_without_two_evaluations_or_after_an_early_stop():
    assert choose(evidence(evaluations=1, best_step=1500)) is None
    assert choose(evidence(best_step=1500, stopped_early=True)) is None


def test_an_overfitting_discriminator_switches_diffaugment_on_once():
    choice = choose(evidence(d_real_sign=0.8))
    assert choice.overrides == {"train": {"cgan": {"diffaug": True}}}
    assert "0.80 > 0.6" in choice.reason
    assert choose(evidence(d_real_sign=0.8, diffaug=True)) is None  # already on
    assert choose(evidence(family="vae", d_real_sign=None, diffaug=None)) is None


def test_the_bakeoff_next_family_when_nothing_else_applies():
    ranked = (("cgan", FAIL), ("vae", (False, -0.08, -2.0)), ("diffusion", FAIL))
    choice = choose(evidence(bakeoff=ranked))
    assert choice.overrides == {"train": {"family": "vae"}} and "#2" in choice.reason
    # vae ran already in this round: the next one; all ran: nothing left, the round ends.
    assert choose(evidence(bakeoff=ranked), run=("cgan", "vae")).overrides == {
        "train": {"family": "diffusion"}
    }
    assert choose(evidence(bakeoff=ranked), run=("cgan", "vae", "diffusion")) is None
    # Training longer comes first: it is evidence about the family that won.
    assert choose(evidence(best_step=1500, bakeoff=ranked)).overrides["train"] == {"steps": 3000}


def test_evidence_is_read_from_the_card_the_params_and_the_report():
    card = {
        "family": "cgan",
        "steps": 600,
        "best_step": 600,
        "stopped_early": False,
        "eval_curve": [{"step": 300, "kid": 0.2}, {"step": 600, "kid": 0.1}],
        "final_losses": {"d_real_sign": 0.9},
    }
    train = {"family": "cgan", "steps": 600, "cgan": {"diffaug": False}}
    report = {"passed": False, "gates": {"fid_ratio": {"value": 2.0}}, "utility": {}}
    ev = evidence_from(card, train, report)
    assert (ev.evaluations, ev.best_step, ev.last_eval_step, ev.steps) == (2, 600, 600, 600)
    assert (ev.d_real_sign, ev.diffaug) == (0.9, False)
    assert ev.key == (False, float("-inf"), -2.0)
    assert choose(ev).overrides == {"train": {"steps": 1200}}
    vae = evidence_from({"family": "vae", "steps": 5}, {"family": "vae", "vae": {}}, report)
    assert (vae.evaluations, vae.best_step, vae.d_real_sign, vae.diffaug) == (0, None, None, None)
