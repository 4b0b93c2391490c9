"""PPO math against numbers worked by hand (each comment shows the arithmetic)."""

import math

import pytest
import torch

from align import losses

approx = lambda x: pytest.approx(x, abs=1e-5)  # noqa: E731


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_full_mask():
    # gamma=1, lam=0.5, V=[.5,.6,.7], r=[0,0,1]
    # t2: d=1-.7=.3 A=.3 | t1: d=0+.7-.6=.1 A=.1+.5*.3=.25 | t0: d=.6-.5=.1 A=.1+.5*.25=.225
    adv, ret = losses.gae(t([0, 0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1.0]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == approx([0.725, 0.85, 1.0])


def test_gae_ignores_steps_after_the_episode_ended():
    # mask=[1,1,0]: V after the last real token is 0, so t1: d=1-.6=.4 A=.4 | t0: d=.6-.5=.1 A=.1+.5*.4=.3
    adv, ret = losses.gae(t([0, 1.0, 0]), t([0.5, 0.6, 0.9]), t([1, 1, 0.0]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == approx([0.3, 0.4, 0.0])
    assert ret[0].tolist() == approx([0.8, 1.0, 0.0])


def test_gae_discounting():
    # gamma=.5, lam=1: t1: d=2-1=1 A=1 | t0: d=0+.5*1-0=.5 A=.5+.5*1=1
    adv, _ = losses.gae(t([0, 2.0]), t([0, 1.0]), t([1, 1.0]), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == approx([1.0, 1.0])


def test_clipped_policy_loss():
    # ratios 1.5 and 0.5, advantage 1, eps .2:
    # token 1: max(-1.5, -1.2) = -1.2 (clipped) | token 2: max(-.5, -.8) = -.5 | mean = -.85
    old = torch.log(t([0.2, 0.2]))
    new = torch.log(t([0.3, 0.1]))
    loss, stats = losses.policy_loss(new, old, t([1.0, 1.0]), t([1.0, 1.0]), clip_range=0.2)
    assert loss.item() == approx(-0.85)
    assert stats["clipfrac"].item() == approx(0.5)
    # approx KL: ((1.5-1-ln 1.5) + (0.5-1-ln 0.5)) / 2 = (0.094535 + 0.193147) / 2
    assert stats["approx_kl"].item() == approx((0.5 - math.log(1.5) - 0.5 + math.log(2)) / 2)


def test_policy_loss_ignores_masked_tokens():
    loss, _ = losses.policy_loss(torch.log(t([0.3, 0.9])), torch.log(t([0.2, 0.1])), t([1.0, 100.0]), t([1.0, 0.0]), 0.2)
    assert loss.item() == approx(-1.2)


def test_clipped_value_loss():
    # V=1, V_old=.5, R=2, eps=.2: clipped V=.7; max((1-2)^2, (.7-2)^2) = 1.69; loss = .845
    loss, stats = losses.value_loss(t([1.0]), t([0.5]), t([2.0]), t([1.0]), clip_range=0.2)
    assert loss.item() == approx(0.845)
    assert stats["vf_clipfrac"].item() == approx(1.0)


def test_kl_estimators():
    # p=.5, p_ref=.25: log r = ln .5 = -.693147
    logp, ref = torch.log(t([0.5])), torch.log(t([0.25]))
    assert losses.kl_penalty(logp, ref, "k1").item() == approx(0.693147)
    assert losses.kl_penalty(logp, ref, "k2").item() == approx(0.5 * 0.693147**2)
    assert losses.kl_penalty(logp, ref, "k3").item() == approx(0.5 - 1 + 0.693147)
    assert losses.kl_penalty(logp, ref, "abs").item() == approx(0.693147)
    assert losses.kl_penalty(logp, logp, "k3").item() == approx(0.0)


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    # coef .5: non-score = -.5*[.1,.2,(.3 masked)] = [-.05,-.1,0]; score 2 lands on index 1
    rewards, non_score = losses.shaped_rewards(t(2.0), t([0.1, 0.2, 0.3]), t([1, 1, 0.0]), kl_coef=0.5)
    assert non_score[0].tolist() == approx([-0.05, -0.1, 0.0])
    assert rewards[0].tolist() == approx([-0.05, 1.9, 0.0])


def test_dense_rewards_stand_where_they_are_put():
    # Process rewards .9 on token 0 and .4 on token 2, plus the same KL penalty; the masked token gets nothing.
    scores = torch.tensor([[0.9, 0.0, 0.4, 7.0]])
    rewards, non_score = losses.shaped_rewards(scores, t([0.1, 0.2, 0.3, 0.4]), t([1, 1, 1, 0.0]), kl_coef=0.5)
    assert non_score[0].tolist() == approx([-0.05, -0.1, -0.15, 0.0])
    assert rewards[0].tolist() == approx([0.85, -0.1, 0.25, 0.0])


def test_running_moments_from_sums_match_the_batch_update():
    x = torch.tensor([1.0, 2.0, 4.0, 7.0])
    by_batch, by_sums = losses.RunningMoments(), losses.RunningMoments()
    by_batch.update(x)
    by_sums.update_sums(4, 14.0, 70.0)  # mean 3.5, var 70/4 - 3.5^2 = 5.25
    assert (by_sums.mean, by_sums.var) == approx((3.5, 5.25))
    assert (by_batch.mean, by_batch.var) == approx((3.5, 5.25))


def test_whitening():
    # [1,2,3,4]: mean 2.5, unbiased var 5/3, std 1.290994
    x = losses.masked_whiten(t([1, 2, 3, 4.0]), t([1, 1, 1, 1.0]))
    assert x[0].tolist() == approx([-1.161895, -0.387298, 0.387298, 1.161895])
    kept = losses.masked_whiten(t([1, 2, 3, 100.0]), t([1, 1, 1, 0.0]))
    assert kept[0].tolist() == approx([-1.0, 0.0, 1.0, 0.0])  # mean 2, var 1; masked entry zeroed


def test_token_logprobs_with_temperature_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert losses.token_logprobs(logits, torch.tensor([[1]])).item() == approx(math.log(0.75))
    # T=2: p1 = sqrt3 / (1 + sqrt3)
    assert losses.token_logprobs(logits, torch.tensor([[1]]), 2.0).item() == approx(math.log(3**0.5 / (1 + 3**0.5)))
    assert losses.entropy_from_logits(torch.zeros(1, 1, 4)).item() == approx(math.log(4))


def test_explained_variance():
    target = t([1.0, 2.0, 3.0, 4.0])
    mask = torch.ones(4)
    assert losses.explained_variance(target, target, mask).item() == approx(1.0)
    assert losses.explained_variance(torch.full((4,), 2.5), target, mask).item() == approx(0.0)


def test_adaptive_kl_controller():
    # KL 12 vs target 6: error clipped to .2; coef .1 * (1 + .2 * 100 / 10000) = .1002
    controller = losses.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(12.0, n_steps=100)
    assert controller.value == approx(0.1002)
    controller.update(3.0, n_steps=100)  # error -.5 clipped to -.2
    assert controller.value == approx(0.1002 * (1 - 0.002))


def test_running_moments():
    moments = losses.RunningMoments()
    moments.update(t([1.0, 2.0, 3.0]))
    moments.update(t([4.0, 5.0]))
    assert moments.mean == approx(3.0) and moments.std == approx(math.sqrt(2.0))
