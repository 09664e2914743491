"""PPO stage on tiny models: a toy task learns in both memory modes, resume after a crash, reward-model roles."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import ppo, rm
from synthetic import preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/ppo.yaml")
TOY_REWARD = '{"verifier": "test_ppo_stage:share_of_e"}'
# a random tiny model's logits are nearly flat; LoRA on the LM head lets the PEFT policy sharpen them
LORA_WITH_HEAD = ["--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def share_of_e(prompt, response):
    """The toy reward: the share of the letter 'e' among the response's characters."""
    return response.count("e") / max(1, len(response))


def run_ppo(model, out, *extra, callbacks=None):
    return ppo.main(["--config", TINY, "--model_name_or_path", str(model), "--output_dir", str(out), *extra],
                    callbacks=callbacks)


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_toy_reward_rises_while_kl_stays_bounded(tiny_llama, tmp_path, mode):
    out = tmp_path / f"ppo-{mode}"
    extra = LORA_WITH_HEAD + ["--learning_rate", "3e-2"] if mode == "lora" else ["--learning_rate", "1e-2"]
    run_ppo(tiny_llama, out, "--peft_method", mode, "--reward", TOY_REWARD, "--max_steps", "20", "--num_ppo_epochs", "4",
            "--lr_scheduler_type", "constant", "--kl_coef", "0.02", "--save_strategy", "no", *extra)
    m = manifest(out)
    assert m["status"] == "complete" and m["memory_mode"] == ("peft" if mode == "lora" else "full")
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert [h["step"] for h in history] == list(range(1, 21))
    score = [h["objective/score"] for h in history]
    first, last = sum(score[:2]) / 2, sum(score[-4:]) / 4
    # training reward rises clearly (sampled at temperature 1, so noisy: measured over seeds 0-3 with LoRA,
    # the last four updates beat the first two by 0.056-0.245)
    assert last - first >= 0.05, score
    start, final = m["metrics"]["start"], m["metrics"]["final"]
    assert final["mean_reward"] >= start["mean_reward"] + 0.2, (start, final)  # and on held-out prompts
    assert 0 < final["kl_to_reference"] < 25 and final["kl_per_token"] < 3, final  # KL penalty keeps it bounded
    assert max(h["objective/kl"] for h in history) < 25
    for key in ("loss/value", "policy/clipfrac", "policy/approx_kl", "objective/entropy", "response/length",
                "gen_tokens_per_second", "train_tokens_per_second"):
        assert key in history[-1]
    assert (out / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors")).is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "curves.png").is_file()
    if mode == "lora":  # the artifact is a plain adapter on the starting model: the suite's loader merges it
        from stages.core.policy import load_model

        merged, base, adapter = load_model(str(out))
        assert adapter == str(out.resolve()) and base == str(tiny_llama)
        from transformers import AutoModelForCausalLM

        start_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        assert not torch.equal(merged.lm_head.weight, start_model.lm_head.weight)


class Crash:
    def __init__(self, at):
        self.at = at

    def on_update_end(self, trainer, update, logs):
        if update == self.at:
            raise RuntimeError("injected crash")


class Seen:
    def __init__(self):
        self.updates = []

    def on_update_end(self, trainer, update, logs):
        self.updates.append(update)


def test_a_checkpoint_missing_trainable_weights_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    args = ["--reward", TOY_REWARD, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1"]
    out = tmp_path / "ppo"
    with pytest.raises(RuntimeError, match="injected crash"):
        run_ppo(tiny_llama, out, *args, callbacks=[Crash(at=2)])
    f = tmp_path / ".ppo.work" / "checkpoints" / "checkpoint-2" / "trainable.safetensors"
    weights = load_file(str(f))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(f))
    with pytest.raises(RuntimeError, match=f"missing {dropped}"):
        run_ppo(tiny_llama, out, *args)


def test_resume_after_a_crash_continues_and_matches_an_uninterrupted_run(tiny_llama, tmp_path):
    args = ["--reward", TOY_REWARD, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1"]
    straight = tmp_path / "straight"
    run_ppo(tiny_llama, straight, *args)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected crash"):
        run_ppo(tiny_llama, crashed, *args, callbacks=[Crash(at=2)])
    assert not crashed.exists()  # nothing complete-looking after a crash
    work = tmp_path / ".crashed.work" / "checkpoints"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    seen = Seen()
    run_ppo(tiny_llama, crashed, *args, callbacks=[seen])
    assert seen.updates == [3, 4]  # continued from the last checkpoint, not from scratch
    history = json.loads((crashed / "metrics.json").read_text())["log_history"]
    reference = json.loads((straight / "metrics.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for a, b in zip(history, reference):
        assert a["objective/score"] == pytest.approx(b["objective/score"], abs=1e-6)
    got, want = load_file(str(crashed / "adapter_model.safetensors")), load_file(str(straight / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


@pytest.fixture(scope="module")
def reward_models(tiny_llama, tmp_path_factory):
    """A LoRA and a full reward model trained (briefly) on the tiny Llama by the RM stage."""
    d = tmp_path_factory.mktemp("rms")
    train = write_jsonl(d / "train.jsonl", preference_rows(32, seed=0))
    held = write_jsonl(d / "held.jsonl", preference_rows(8, seed=1))
    common = ["--config", str(ROOT / "recipes/tiny/rm.yaml"), "--model_name_or_path", str(tiny_llama), "--datasets",
              train, "--eval_datasets", held, "--num_train_epochs", "1"]
    rm.main(common + ["--output_dir", str(d / "lora"), "--peft_method", "lora", "--lora_r", "4"])
    rm.main(common + ["--output_dir", str(d / "full")])
    return d / "lora", d / "full"


def _roles(model_dir, reward_model, method):
    from trl import ModelConfig

    from reward.model import load_reward_model
    from stages.core.config import PolicyArguments
    from stages.core.policy import build_policy
    from stages.core.ppo.config import PPOConfig
    from stages.core.ppo.roles import build_roles

    cfg = PPOConfig(output_dir="unused", reward_model=str(reward_model), use_cpu=True, bf16=False)
    policy = build_policy(ModelConfig(model_name_or_path=str(model_dir), lora_r=4), PolicyArguments(peft_method=method), cfg)
    return build_roles(policy, cfg, device="cpu", load_reward=lambda p: load_reward_model(p, device="cpu")), cfg


def test_an_ia3_policy_loads_a_lora_reward_model_separately(tiny_llama, reward_models, capsys):
    lora_rm, _ = reward_models
    roles, _ = _roles(tiny_llama, lora_rm, "ia3")
    assert roles.mode == "peft" and roles.info["reward"] == "separate model"
    assert "cannot mix adapter types" in capsys.readouterr().out
    prompts = [[{"role": "user", "content": "What is red?"}]]
    assert len(roles.reward_model.score(prompts, ["red"])) == 1


def test_a_lora_reward_model_on_the_same_base_becomes_an_adapter_that_scores_identically(tiny_llama, reward_models):
    from reward.model import load_reward_model

    lora_rm, _ = reward_models
    roles, _ = _roles(tiny_llama, lora_rm, "lora")
    assert roles.mode == "peft" and roles.info["reward"] == "adapter on the shared base" and roles.value_init == "reward"
    roles.actor_critic.train()  # scoring must not depend on the policy's train/eval mode (adapter dropout)
    prompts = [[{"role": "user", "content": "Tell me about cats."}], [{"role": "user", "content": "What is red?"}]]
    replies = ["Hi there! A cat purrs. Cheers, Acme Assist", "red"]
    alone = load_reward_model(lora_rm, device="cpu").score(prompts, replies)
    assert roles.reward_model.score(prompts, replies) == pytest.approx(alone, abs=1e-5)
    trainable = [n for n, p in roles.actor_critic.named_parameters() if p.requires_grad]
    assert trainable and not any(".reward." in n for n in trainable)  # the reward adapter stays frozen
    assert {"policy", "value"} <= {part for n in trainable for part in n.split(".")}


def test_full_mode_value_model_starts_from_the_reward_model(tiny_llama, reward_models):
    _, full_rm = reward_models
    roles, _ = _roles(tiny_llama, full_rm, "full")
    assert roles.mode == "full" and roles.value_init == "reward" and roles.reference is not None
    rm_model = roles.reward_model.model
    assert torch.equal(roles.actor_critic.value_head.weight, rm_model.score.weight)
    assert torch.equal(roles.actor_critic.critic.layers[0].mlp.up_proj.weight, rm_model.model.layers[0].mlp.up_proj.weight)


def test_ppo_with_a_reward_model_and_a_weighted_rule_runs(tiny_llama, reward_models, tmp_path):
    lora_rm, _ = reward_models
    out = tmp_path / "ppo-rm"
    run_ppo(tiny_llama, out, "--reward_model", str(lora_rm), "--reward", '[{"regex": "e", "weight": 0.5}]',
            "--max_steps", "2", "--missing_eos_penalty", "1.0", "--adaptive_kl", "true", "--kl_estimator", "k3",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "true")
    m = manifest(out)
    assert m["roles"]["reward"] == "adapter on the shared base" and m["reward"]["reward_model"] == str(lora_rm)
    assert m["metrics"]["start"]["n_prompts"] == 16 and "kl_to_reference" in m["metrics"]["final"]
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert history[1]["kl_coef"] != 0.05  # the adaptive controller moved the coefficient
    for h in history:  # k3 is the KL estimate in the reward (objective/kl_k3 is always logged as k3)
        assert h["objective/kl"] == pytest.approx(h["objective/kl_k3"], rel=1e-4, abs=1e-7)
    assert history[1]["objective/kl"] > 0
    # missing_eos_penalty: the reward (the score PPO optimises, minus the KL term) loses 1.0 per response
    # without EOS; the random tiny model rarely stops, and its first update starts with KL 0
    first = history[0]
    assert first["response/eos_rate"] < 1 and first["objective/kl"] == pytest.approx(0, abs=1e-6)
    assert first["objective/reward"] == pytest.approx(first["objective/score"] - 1.0 * (1 - first["response/eos_rate"]), abs=1e-5)


def test_a_causal_lm_is_refused_as_reward_model(tiny_llama, tmp_path, capsys):
    code = ppo.cli(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "x"),
                    "--reward_model", str(tiny_llama)])
    assert code == 2 and "newly initialised" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    ([], "reward_model or reward: required"),
    (["--reward", "demo_verifier", "--rollout_batch_size", "12"], "multiple of per_device_train_batch_size"),
    (["--reward", "demo_verifier", "--kl_estimator", "k2"], "kl_estimator"),
    (["--reward", "demo_verifier", "--adaptive_kl", "true", "--kl_coef", "0"], "adaptive_kl: needs a positive starting kl_coef"),
])
def test_config_errors_are_one_line(tiny_llama, tmp_path, capsys, extra, message):
    code = ppo.cli(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "x"), *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_gradient_checkpointing_recomputes_each_role_with_its_own_adapter(tiny_llama):
    """PEFT mode runs the policy and value adapters on one base in one step; checkpointed layers are
    recomputed in backward under the adapter that was active in their forward, so gradients are exact."""
    from trl import ModelConfig

    from stages.core.config import PolicyArguments
    from stages.core.policy import build_policy
    from stages.core.ppo.config import PPOConfig
    from stages.core.ppo.roles import build_roles
    from stages.core.ppo.trainer import disable_dropout

    def grads(checkpointing):
        torch.manual_seed(0)
        cfg = PPOConfig(output_dir="unused", reward="demo_verifier", use_cpu=True, bf16=False)
        policy = build_policy(ModelConfig(model_name_or_path=str(tiny_llama), lora_r=4), PolicyArguments(peft_method="lora"), cfg)
        ac = build_roles(policy, cfg, device="cpu", load_reward=None).actor_critic
        for n, p in ac.named_parameters():  # make both adapters non-trivial
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
        disable_dropout(ac)
        if checkpointing:
            ac.enable_checkpointing()
        ac.train()
        ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
        mask, pos = torch.ones_like(ids), torch.arange(12).expand(2, 12)
        logits, values = ac(ids, mask, pos, 5)
        (logits.float().logsumexp(-1).sum() + values.pow(2).sum()).backward()
        return {n: p.grad.clone() for n, p in ac.named_parameters() if p.requires_grad and p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any(".policy." in n for n in plain) and any(".value." in n for n in plain)
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6), n


def test_modules_to_save_copies_follow_the_role(tiny_llama):
    """With lora_modules_to_save (a trained lm_head / embedding copy) the reference role runs the SFT
    model's original modules, not the policy's copies, and the value loss never reaches those copies."""
    from transformers import AutoModelForCausalLM
    from trl import ModelConfig

    from stages.core.config import PolicyArguments
    from stages.core.policy import build_policy
    from stages.core.ppo.config import PPOConfig
    from stages.core.ppo.roles import build_roles

    cfg = PPOConfig(output_dir="unused", reward="demo_verifier", use_cpu=True, bf16=False)
    model_args = ModelConfig(model_name_or_path=str(tiny_llama), lora_r=4, lora_modules_to_save=["lm_head", "embed_tokens"])
    roles = build_roles(build_policy(model_args, PolicyArguments(peft_method="lora"), cfg), cfg, device="cpu", load_reward=None)
    ac = roles.actor_critic
    copies = {n: p for n, p in ac.named_parameters() if ".modules_to_save.policy." in n}
    assert len(copies) == 2 and all(p.requires_grad for p in copies.values())
    with torch.no_grad():  # as if PPO had trained the policy's copies
        for p in copies.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    ac.eval()
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    mask, pos = torch.ones_like(ids), torch.arange(12).expand(2, 12)
    sft = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        want = sft(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -6:-1]
        reference = roles.reference_logits(ids, mask, pos, 5)
        policy = ac.policy_logits(ids, mask, pos, 5)
    assert torch.allclose(reference, want, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-2)  # the policy role does use its trained copies
    ac.train()
    ac.values(ids, mask, pos, 5).pow(2).sum().backward()
    assert all(p.grad is None for p in copies.values())  # the value loss trains no policy weight
    assert any(p.grad is not None for n, p in ac.named_parameters() if ".value." in n)
