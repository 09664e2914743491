"""PPO mathematics against hand-computed values (no models), plus padding invariance of the rollout layout."""
import math

import pytest
import torch

from stages.core.ppo import losses as L
from stages.core.ppo import rollout as R


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_gae_and_returns_match_a_hand_computed_example():
    # row 0: three real tokens; row 1: two real tokens then padding (the 9.9 value must be ignored)
    rewards = t([[0.0, 0.0, 1.0], [0.2, 1.0, 0.0]])
    values = t([[0.5, 0.4, 0.3], [0.1, 0.2, 9.9]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # d2 = 1 - .3 = .7; d1 = .9*.3 - .4 = -.13; d0 = .9*.4 - .5 = -.14; gl = .72
    # A2 = .7; A1 = -.13 + .72*.7 = .374; A0 = -.14 + .72*.374 = .12928
    # row 1: d1 = 1 - .2 = .8; d0 = .2 + .9*.2 - .1 = .28; A0 = .28 + .72*.8 = .856
    assert torch.allclose(adv, t([[0.12928, 0.374, 0.7], [0.856, 0.8, 0.0]]), atol=1e-9)
    assert torch.allclose(ret, t([[0.62928, 0.774, 1.0], [0.956, 1.0, 0.0]]), atol=1e-9)


def test_gae_with_lambda_one_and_no_discount_is_reward_to_go_minus_value():
    rewards, values, mask = t([[1.0, -2.0, 3.0, 0.5]]), t([[0.3, -0.1, 0.7, 0.2]]), t([[1, 1, 1, 1]])
    adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = t([[2.5, 1.5, 3.5, 0.5]])
    assert torch.allclose(ret, to_go) and torch.allclose(adv, to_go - values)


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    logp, ref = t([[-1.0, -1.0, -1.0]]), t([[-1.5, -1.0, -0.5]])
    rewards, kl = L.per_token_rewards(t([1.0]), logp, ref, t([[1, 1, 0]]), kl_coef=0.1)
    assert torch.allclose(kl, t([[0.5, 0.0, 0.0]]))
    assert torch.allclose(rewards, t([[-0.05, 1.0, 0.0]]))


def test_clipped_policy_loss_clipfrac_and_approx_kl_by_hand():
    old = torch.log(t([[0.4, 0.4, 0.4]]))
    new = torch.log(t([[0.5, 0.3, 0.4]]))  # ratios 1.25, 0.75, 1.0
    adv, mask = t([[1.0, -2.0, 0.5]]), t([[1, 1, 1]])
    loss, stats = L.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.25, -1.2) = -1.2 (clipped); token 1: max(1.5, 1.6) = 1.6 (clipped); token 2: -0.5
    assert loss.item() == pytest.approx((-1.2 + 1.6 - 0.5) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    # k3 of KL(old || new) on old's samples: (r - 1) - log r, r = 1.25, 0.75, 1
    k3 = [(1.25 - 1) - math.log(1.25), (0.75 - 1) - math.log(0.75), 0.0]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3)


def test_policy_loss_gradient_is_zero_where_the_clip_is_active():
    old = torch.log(t([[0.4, 0.4]]))
    new = torch.log(t([[0.5, 0.41]])).requires_grad_(True)  # ratio 1.25 clipped (A > 0), 1.025 inside
    loss, _ = L.policy_loss(new, old, t([[1.0, 1.0]]), t([[1, 1]]), cliprange=0.2)
    loss.backward()
    assert new.grad[0, 0].item() == 0.0 and new.grad[0, 1].item() == pytest.approx(-1.025 / 2)


def test_clipped_value_loss_by_hand():
    values, old, returns = t([[1.0, 0.0, 0.9]]), t([[0.5, 0.5, 0.5]]), t([[0.8, 1.0, 1.5]])
    loss, stats = L.value_loss(values, old, returns, t([[1, 1, 1]]), cliprange_value=0.2)
    # clipped values .7, .3, .7 -> max((V-R)^2, (Vc-R)^2) = .04, 1.0, .64 (only the last is the clipped term)
    assert loss.item() == pytest.approx(0.5 * (0.04 + 1.0 + 0.64) / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


def test_kl_estimators_by_hand_and_both_unbiased_for_the_exact_kl():
    assert L.kl_k1(t(math.log(0.5)), t(math.log(0.25))).item() == pytest.approx(math.log(2))
    assert L.kl_k3(t(math.log(0.5)), t(math.log(0.25))).item() == pytest.approx(-0.5 + math.log(2))
    assert L.kl_k1(t(math.log(0.2)), t(math.log(0.4))).item() == pytest.approx(-math.log(2))  # k1 can be negative
    assert L.kl_k3(t(math.log(0.2)), t(math.log(0.4))).item() == pytest.approx(1 - math.log(2))  # k3 never is
    p, q = t([0.5, 0.3, 0.2]), t([0.25, 0.25, 0.5])
    exact = float((p * (p / q).log()).sum())
    for k in (L.kl_k1, L.kl_k3):  # expectation under p, enumerated exactly
        assert float((p * k(p.log(), q.log())).sum()) == pytest.approx(exact)
    assert L.kl_full(p.log()[None], q.log()[None]).item() == pytest.approx(exact)


def test_masked_whiten_ignores_padding():
    out = L.masked_whiten(t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0]))
    assert torch.allclose(out, t([-1.0, 0.0, 1.0, 0.0]), atol=1e-6)
    assert L.masked_mean(t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])).item() == pytest.approx(2.0)


def test_kl_controller_fixed_and_adaptive():
    fixed = L.KLController(0.1)
    assert fixed.update(50.0, 100) == 0.1
    up, down = L.KLController(0.1, adaptive=True, target=6.0, horizon=10000), L.KLController(0.1, adaptive=True, target=6.0, horizon=10000)
    assert up.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped at +0.2
    assert down.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))  # 5.4 / 6 - 1 = -0.1


def test_cut_at_eos_masks_after_the_first_eos_and_flags_missing_eos():
    eos, pad = 2, 3
    resp = torch.tensor([[5, 6, 2, 7, 8], [5, 2, 2, 9, 9], [5, 6, 7, 8, 9]])
    out, mask, has_eos, lengths = R.cut_at_eos(resp, [eos], pad)
    assert out.tolist() == [[5, 6, 2, 3, 3], [5, 2, 3, 3, 3], [5, 6, 7, 8, 9]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False] and lengths.tolist() == [3, 2, 5]


def test_model_inputs_count_positions_over_real_tokens_only():
    q, qm = R.left_pad([[10, 11, 12], [13]], pad_id=0)
    ids, mask, pos = R.model_inputs(q, qm, torch.tensor([[4, 5], [6, 0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert ids.tolist() == [[10, 11, 12, 4, 5], [0, 0, 13, 6, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert pos[1, 2:4].tolist() == [0, 1] and pos[0].tolist() == [0, 1, 2, 3, 4]


def test_log_probs_do_not_depend_on_padding(tiny_llama):
    """A row's per-token log-probs are the same alone and inside a left/right-padded batch, and the
    reference log-probs come from the reference model (a different one here), not from the policy."""
    import copy

    from transformers import AutoModelForCausalLM

    from stages.core.ppo.roles import ActorCritic, Roles, new_value_head

    lm = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    reference = copy.deepcopy(lm)
    with torch.no_grad():
        reference.lm_head.weight.mul_(3.0)  # a sharper reference: its log-probs differ from the policy's
    ac = ActorCritic(lm, new_value_head(lm.config.hidden_size), critic=lm.model)
    roles = Roles(ac, None, reference, "full", "policy")
    long_q, short_q = [1, 40, 41, 42, 43, 44], [1, 50, 51]
    resp = torch.tensor([[60, 61, 62], [70, 71, 2]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    q, qm = R.left_pad([long_q, short_q], pad_id=3)
    batch = {"query": q, "query_mask": qm, "response": resp, "mask": mask}
    both = R.score_tokens(roles, batch, temperature=0.7, micro_batch=2)
    q1, qm1 = R.left_pad([short_q], pad_id=3)
    alone = R.score_tokens(roles, {"query": q1, "query_mask": qm1, "response": resp[1:], "mask": mask[1:]},
                           temperature=0.7, micro_batch=1)
    assert torch.allclose(both["logprobs"][1], alone["logprobs"][0], atol=1e-5)
    # the reference log-probs of row 1 by hand: the reference model on the unpadded prompt + response
    ids = torch.tensor([short_q + resp[1].tolist()])
    with torch.no_grad():
        logits = reference(input_ids=ids).logits[0, len(short_q) - 1:-1] / 0.7
    by_hand = torch.log_softmax(logits, -1).gather(-1, resp[1][:, None]).squeeze(-1)
    assert torch.allclose(both["ref_logprobs"][1], by_hand, atol=1e-5)
    assert not torch.allclose(both["ref_logprobs"], both["logprobs"], atol=1e-2)
