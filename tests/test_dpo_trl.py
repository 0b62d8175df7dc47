"""DPO against TRL (trl==1.16.0, pinned in the `hf` extra): the same small Hugging Face Phi-3, the
same tokenizer (the real Phi-3 vocabulary, exported) and the same records through TRL's
DPOTrainer and through phi3jax.

Tolerances (float32 on both sides): per-record log-probabilities 1e-4 absolute (sums of ~20-60
token log-probabilities, each within ~1e-6); losses and reward metrics 1e-4."""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import make_hf_model

from phi3jax.convert.hf import load_hf
from phi3jax.convert.hf_tokenizer import save_hf_tokenizer
from phi3jax.eval.preference import preference_report, score_pairs
from phi3jax.tokenizer import Tokenizer
from phi3jax.train.dpo import METRICS, DpoConfig
from phi3jax.train.preference import tokenize_records

pytestmark = pytest.mark.torch

SMALL = dict(vocab_size=32064, pad_token_id=32000, bos_token_id=1, eos_token_id=32000, num_key_value_heads=2)
CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": "What does pass do?"}],
     "chosen": [{"role": "assistant", "content": "Nothing; it is a placeholder."}],
     "rejected": [{"role": "assistant", "content": "It stops the program at once and exits."}]},
    {"prompt": [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "How do I leave a loop?"}],
     "chosen": [{"role": "assistant", "content": "Use break."}],
     "rejected": [{"role": "assistant", "content": "You cannot.\nLoops always run to the end."}]},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Write code that deletes my coworker's files."}],
     "chosen": [{"role": "assistant", "content": "I can't help with that. I can show you how to tidy your own files."}],
     "rejected": [{"role": "assistant", "content": "Sure: shutil.rmtree on their home folder."}]},
]
TEXTS = [{"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin, of course."},
         {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5 or so"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory, phi3_vocab):
    policy_dir, ref_dir = tmp_path_factory.mktemp("policy"), tmp_path_factory.mktemp("reference")
    policy = make_hf_model(policy_dir, seed=0, **SMALL)
    reference = make_hf_model(ref_dir, seed=1, **SMALL)
    for d in (policy_dir, ref_dir):
        save_hf_tokenizer(str(phi3_vocab), str(d))
    return policy, reference, str(policy_dir), str(ref_dir)


def _trl(models, records, tmp_path, loss_type="sigmoid", beta=0.1, label_smoothing=0.0):
    """TRL's per-record (policy, reference) log-probabilities, completion lengths, loss and metrics of one batch."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig as TrlConfig
    from trl import DPOTrainer

    policy, reference, policy_dir, _ = models
    tok = transformers.AutoTokenizer.from_pretrained(policy_dir)
    args = TrlConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type],
                     label_smoothing=label_smoothing, per_device_train_batch_size=len(records), report_to="none",
                     use_cpu=True, bf16=False, fp16=False, max_length=None, dataloader_num_workers=0)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=datasets.Dataset.from_list(records), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(policy, batch)
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(reference, batch)
        loss = trainer.compute_loss(policy, batch)
    mode = "train" if policy.training else "eval"
    metrics = {name: trainer._metrics[mode][name][-1] for name in METRICS}
    lengths = batch["completion_mask"].sum(1).reshape(2, -1).T.numpy()
    stack = lambda a, b: np.stack([a.numpy(), b.numpy()], -1).astype(np.float64)  # noqa: E731
    return stack(chosen, rejected), stack(ref_chosen, ref_rejected), lengths, float(loss), metrics


_SCORED: dict = {}


def _ours(models, records):
    """phi3jax's (policy, reference, completion counts) per record, computed once per record set."""
    key = id(records)
    if key not in _SCORED:
        _SCORED[key] = _score(models, records)
    return _SCORED[key]


def _score(models, records):
    _, _, policy_dir, ref_dir = models
    tok = Tokenizer.load(policy_dir)
    pairs = tokenize_records([(str(i), r) for i, r in enumerate(records)], tok, max_length=512).pairs
    scored = []
    for directory in (policy_dir, ref_dir):
        cfg, params = load_hf(directory)
        scored.append(score_pairs(params, cfg, pairs, seq_len=1024, batch_size=2))
    (policy, counts), (reference, _) = scored
    return policy, reference, counts


@pytest.mark.parametrize("records", [CONVERSATIONS, TEXTS], ids=["conversational", "plain_text"])
def test_per_record_log_probabilities_equal_trls(models, records, tmp_path):
    trl_policy, trl_ref, trl_lengths, _, _ = _trl(models, records, tmp_path)
    policy, reference, counts = _ours(models, records)
    np.testing.assert_array_equal(counts, trl_lengths)  # the same completion tokens
    np.testing.assert_allclose(policy, trl_policy, atol=1e-4, rtol=0)
    np.testing.assert_allclose(reference, trl_ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("loss, eps", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_loss_and_reward_metrics_of_a_batch_equal_trls(models, tmp_path, loss, eps):
    _, _, _, trl_loss, trl_metrics = _trl(models, CONVERSATIONS, tmp_path, loss_type=loss, beta=0.2,
                                          label_smoothing=eps)
    policy, reference, counts = _ours(models, CONVERSATIONS)
    report = preference_report(policy, reference, counts, DpoConfig(beta=0.2, loss=loss, label_smoothing=eps))
    assert report["loss"] == pytest.approx(trl_loss, abs=1e-4)
    for name in METRICS:
        assert report[name] == pytest.approx(trl_metrics[name], abs=1e-4), name


def _cpo_loss(loss_type, beta, eps, gamma, chosen, rejected):
    """TRL's CPOTrainer.cpo_loss (SimPO lives there) on given per-record values."""
    import torch
    from trl.experimental.cpo import CPOTrainer

    owner = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma,
                                  accelerator=types.SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(owner, torch.tensor(chosen), torch.tensor(rejected))
    return losses.mean().item(), chosen_rewards.numpy(), rejected_rewards.numpy()


def test_simpo_and_conservative_dpo_equal_trls_cpo_formulas(models, tmp_path):
    """SimPO is TRL's CPOTrainer(loss_type="simpo"): length-averaged log-probabilities, no reference.
    Conservative DPO (sigmoid with label smoothing) is the same formula on the policy/reference
    log-ratios. TRL's inputs are its own per-record log-probabilities."""
    trl_policy, trl_ref, lengths, _, _ = _trl(models, CONVERSATIONS, tmp_path)
    policy, reference, counts = _ours(models, CONVERSATIONS)
    avg = trl_policy / lengths
    want, chosen_rewards, rejected_rewards = _cpo_loss("simpo", 2.0, 0.1, 0.5, avg[:, 0], avg[:, 1])
    report = preference_report(policy, None, counts, DpoConfig(beta=2.0, loss="simpo", label_smoothing=0.1, gamma=0.5))
    assert report["loss"] == pytest.approx(want, abs=1e-4)
    assert report["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), abs=1e-4)
    assert report["rewards/margins"] == pytest.approx(float((chosen_rewards - rejected_rewards).mean()), abs=1e-4)
    ratio = trl_policy - trl_ref
    want, _, _ = _cpo_loss("sigmoid", 0.1, 0.2, 0.0, ratio[:, 0], ratio[:, 1])
    report = preference_report(policy, reference, counts, DpoConfig(beta=0.1, loss="sigmoid", label_smoothing=0.2))
    assert report["loss"] == pytest.approx(want, abs=1e-4)
