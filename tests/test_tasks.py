"""Tests for rl4llm.tasks: tokenizer, exact rewards, splits, warm start, Bradley-Terry preference pairs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm.lm import TinyLM, TinyLMConfig
from rl4llm.tasks import (
    DEFAULT_ALPHABET,
    AdditionTask,
    CharTokenizer,
    CopyTask,
    SortTask,
    accuracy,
    preference_pairs,
    sample_preference_pairs,
    supervised_warmstart,
)

TOK = CharTokenizer()
PAD, BOS, EOS = TOK.pad_id, TOK.bos_id, TOK.eos_id


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def completion(texts: list[str | list[int]], L: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion tensors from answer strings (with <eos> appended) or raw id lists."""
    rows = [TOK.encode(t, eos=True) if isinstance(t, str) else t for t in texts]
    tokens = torch.tensor([r + [PAD] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (L - len(r)) for r in rows])
    return tokens, mask


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=20))
def test_tokenizer_round_trip(text):
    ids = TOK.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) == len(text) + 2
    assert TOK.decode(ids) == text
    assert TOK.decode(TOK.encode(text)) == text


def test_tokenizer_specials_and_errors():
    assert (PAD, BOS, EOS) == (0, 1, 2) and TOK.vocab_size == 3 + len(DEFAULT_ALPHABET)
    assert TOK.decode(TOK.encode("12", eos=True) + TOK.encode("34")) == "12"
    assert TOK.decode(TOK.encode("12", eos=True) + TOK.encode("34"), stop_at_eos=False) == "1234"
    with pytest.raises(ValueError, match="alphabet"):
        TOK.encode("1 2")
    with pytest.raises(ValueError, match="ids"):
        TOK.decode([TOK.vocab_size])
    with pytest.raises(ValueError, match="alphabet"):
        CharTokenizer("aa")
    with pytest.raises(ValueError, match="same length"):
        TOK.encode_batch(["1", "12"])
    batch = TOK.encode_batch(["12", "34"], bos=True)
    assert batch.shape == (2, 3) and TOK.decode_batch(batch) == ["12", "34"]
    assert TOK.decode_batch(batch, torch.tensor([[1, 1, 0], [1, 0, 1]])) == ["1", "4"]


# ----------------------------------------------------------------------------------------------------------
# Tasks and rewards
# ----------------------------------------------------------------------------------------------------------
def test_answers():
    add = AdditionTask(2)
    assert add.answer("12+34=") == "46" and add.answer("99+99=") == "198" and add.answer("00+07=") == "7"
    assert CopyTask(4).answer("c0912=") == "0912"
    assert SortTask(4).answer("s3141=") == "1134"
    assert add.prompt_len == 7 and add.max_new_tokens == 4
    assert CopyTask(4).prompt_len == 7 and CopyTask(4).max_new_tokens == 5
    with pytest.raises(ValueError, match="prompt"):
        add.answer("123+4=")
    with pytest.raises(ValueError, match="prompt"):
        SortTask(4).answer("c1234=")


def test_addition_reward_hand_examples():
    task = AdditionTask(2)
    prompts = task.encode_prompts(["12+34="] * 6 + ["99+99="])
    tokens, mask = completion([
        "46",                                 # correct
        "47",                                 # wrong digit
        "046",                                # leading zero: not the answer
        TOK.encode("46"),                     # missing eos (budget ran out)
        TOK.encode("46", eos=True) + [TOK.encode("1")[0]],  # a token after eos that is not masked out
        "4",                                  # truncated answer
        "198",                                # correct, three digits
    ])
    assert task.reward(prompts, tokens, mask).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # tokens after <eos> are ignored when masked out, whatever they are
    tokens[0, 3:] = TOK.encode("77")[0]
    assert task.reward(prompts[:1], tokens[:1], mask[:1]).item() == 1.0
    # an empty response scores 0
    assert task.reward(prompts[:1], tokens[:1], torch.zeros(1, 5)).item() == 0.0


def test_copy_and_sort_rewards():
    copy, sort = CopyTask(4), SortTask(4)
    tokens, mask = completion(["3141", "1134", "3141"])
    assert copy.reward(copy.encode_prompts(["c3141="] * 3), tokens, mask).tolist() == [1.0, 0.0, 1.0]
    assert sort.reward(sort.encode_prompts(["s3141="] * 3), tokens, mask).tolist() == [0.0, 1.0, 0.0]


def test_reward_bad_input():
    task = AdditionTask(2)
    prompts = task.encode_prompts(["12+34=", "01+02="])
    tokens, mask = completion(["46", "3"])
    with pytest.raises(ValueError, match="completion_tokens"):
        task.reward(prompts, torch.full_like(tokens, TOK.vocab_size), mask)
    with pytest.raises(ValueError, match="completion_mask"):
        task.reward(prompts, tokens, mask[:, :3])
    with pytest.raises(ValueError, match="completion_tokens"):
        task.reward(prompts, tokens[:, :0], mask[:, :0])
    with pytest.raises(ValueError, match="B"):
        task.reward(prompts[:1], tokens, mask)
    with pytest.raises(ValueError, match="prompt"):
        task.reward(CopyTask(2).encode_prompts(["c12=", "c34="]), tokens, mask)


def test_reference_answers_score_one():
    for task in (AdditionTask(2), AdditionTask(3), CopyTask(5), SortTask(5)):
        prompts = task.sample_prompts(64, generator=torch.Generator().manual_seed(0))
        tokens, mask = task.answer_tokens(prompts)
        assert tokens.shape == (64, task.max_new_tokens)
        assert task.reward(task.encode_prompts(prompts), tokens, mask).eq(1.0).all()


def test_splits_are_disjoint_and_fixed_by_seed():
    task = AdditionTask(2, test_fraction=0.2, split_seed=7)
    train = set(task.sample_prompts(3000, generator=torch.Generator().manual_seed(0), split="train"))
    test = set(task.sample_prompts(1000, generator=torch.Generator().manual_seed(0), split="test"))
    assert train and test and not train & test
    assert all(task.is_test(p) for p in test) and not any(task.is_test(p) for p in train)
    share = sum(task.is_test(f"{a:02d}+{b:02d}=") for a in range(100) for b in range(100)) / 10_000
    assert abs(share - 0.2) < 0.02
    other = AdditionTask(2, test_fraction=0.2, split_seed=8)
    assert {p for p in test if other.is_test(p)} != test
    a = task.sample_prompts(5, generator=torch.Generator().manual_seed(3))
    assert a == task.sample_prompts(5, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="split"):
        task.sample_prompts(5, split="valid")
    with pytest.raises(ValueError, match="test_fraction"):
        AdditionTask(2, test_fraction=0.0)
    tiny = CopyTask(1, test_fraction=0.01)  # 10 possible prompts, none of them held out
    assert not any(tiny.is_test(f"c{i}=") for i in range(10))
    with pytest.raises(ValueError, match="split"):
        tiny.sample_prompts(5, split="test")


# ----------------------------------------------------------------------------------------------------------
# Warm start and accuracy
# ----------------------------------------------------------------------------------------------------------
def _oracle(task):
    """A callable 'model' that puts all its mass on the reference answer."""

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        out = torch.zeros(B, T, TOK.vocab_size)
        for b in range(B):
            prompt = TOK.decode(ids[b, : task.prompt_len])
            target = TOK.encode(task.answer(prompt), eos=True)
            k = T - task.prompt_len  # tokens generated so far
            out[b, -1, target[k] if k < len(target) else PAD] = 30.0
        return out

    return logits_fn


def test_accuracy_of_an_oracle_and_a_random_model():
    task = AdditionTask(2)
    assert accuracy(_oracle(task), task, n=50) == 1.0
    assert accuracy(_oracle(task), task, n=50, greedy=False) == 1.0
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=TOK.vocab_size, max_len=16))
    assert accuracy(model, task, n=100) == 0.0


def test_warmstart_reduces_loss():
    task = AdditionTask(2)
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=TOK.vocab_size, max_len=16, d_model=32))
    hist = supervised_warmstart(model, task, steps=40, batch_size=32, lr=3e-3, seed=0)
    assert hist.steps == 40 and hist.seconds > 0 and not hist.eval_steps
    first, last = sum(hist.loss[:5]) / 5, sum(hist.loss[-5:]) / 5
    assert first > math.log(TOK.vocab_size) - 0.5  # starts near uniform
    assert last < 0.7 * first
    with pytest.raises(ValueError, match="steps"):
        supervised_warmstart(model, task, steps=0)
    with pytest.raises(ValueError, match="stop_at_accuracy"):
        supervised_warmstart(model, task, steps=1, stop_at_accuracy=1.5)


def test_warmstart_stops_at_target_accuracy():
    task = SortTask(2)
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=TOK.vocab_size, max_len=8, d_model=32))
    hist = supervised_warmstart(model, task, steps=400, batch_size=32, seed=0, stop_at_accuracy=0.5,
                                eval_every=10, eval_n=64)
    assert hist.steps < 400 and hist.steps == hist.eval_steps[-1] and hist.steps % 10 == 0
    assert hist.eval_accuracy[-1] >= 0.5 and all(a < 0.5 for a in hist.eval_accuracy[:-1])
    assert accuracy(model, task, n=200) > 0.2  # held-out prompts too


# ----------------------------------------------------------------------------------------------------------
# Preference pairs
# ----------------------------------------------------------------------------------------------------------
def test_preference_labels_follow_bradley_terry():
    n = 20_000
    prompts = torch.full((n, 1), BOS)
    first, second = torch.full((n, 3), 5), torch.full((n, 3), 6)
    mask = torch.ones(n, 3)
    # known reward: r(first) - r(second) takes the values -1, 0, 0.5, 2 on four blocks of rows
    gap = torch.tensor([-1.0, 0.0, 0.5, 2.0]).repeat_interleave(n // 4)

    def reward_fn(p, tokens, m):
        return torch.where(tokens[:, 0] == 5, gap, torch.zeros(n))

    for scale in (1.0, 0.5):
        pairs = preference_pairs(reward_fn, prompts, first, mask, second, mask, scale=scale,
                                 generator=torch.Generator().manual_seed(0))
        expected = torch.sigmoid(scale * gap)
        torch.testing.assert_close(pairs.prob_first, expected)
        won = pairs.first_preferred.float().view(4, -1).mean(1)
        assert (won - expected.view(4, -1)[:, 0]).abs().max() < 0.03  # sd ~ 0.007
        chosen_first = pairs.first_preferred[:, None]
        assert torch.equal(pairs.chosen, torch.where(chosen_first, first, second))
        assert torch.equal(pairs.rejected, torch.where(chosen_first, second, first))
        assert torch.equal(pairs.chosen_reward, torch.where(pairs.first_preferred, gap, torch.zeros(n)))


def test_preference_pairs_from_a_task_and_policy():
    task = AdditionTask(2)
    gen = torch.Generator().manual_seed(0)
    pairs = sample_preference_pairs(_oracle(task), task, 8, generator=gen)
    assert pairs.chosen.shape == pairs.rejected.shape == pairs.chosen_mask.shape == (8, task.max_new_tokens)
    assert (pairs.chosen_reward == 1).all() and (pairs.prob_first == 0.5).all()  # both right: a coin flip
    # one right answer against one wrong answer: the right one wins with probability sigmoid(scale)
    prompts = task.encode_prompts(["12+34="] * 2000)
    right, mask = completion(["46"] * 2000)
    wrong, _ = completion(["47"] * 2000)
    pairs = preference_pairs(task.reward, prompts, right, mask, wrong, mask, scale=2.0, generator=gen)
    assert abs(pairs.first_preferred.float().mean().item() - 1 / (1 + math.exp(-2.0))) < 0.03
    assert torch.equal(pairs.chosen_reward == 1, pairs.first_preferred)
    with pytest.raises(ValueError, match="second_mask"):
        preference_pairs(task.reward, prompts, right, mask, wrong, mask * 0, generator=gen)
    with pytest.raises(ValueError, match="second"):
        preference_pairs(task.reward, prompts, right, mask, wrong[:, :3], mask[:, :3], generator=gen)
    with pytest.raises(ValueError, match="scale"):
        preference_pairs(task.reward, prompts, right, mask, wrong, mask, scale=-1.0)
