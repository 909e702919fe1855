"""The shared evaluation loop: chunking, truncation, history masking, shape checks, baselines."""
import numpy as np
import pytest
import torch

from seqrec.data.batching import PAD, last_items, make_batch, pad_histories
from seqrec.data.dataset import EvalRows
from seqrec.eval.baselines import ItemTransition, LastItemRepeater, MostPop
from seqrec.eval.evaluator import EvalSettings, chunk_size_for, evaluate, mask_history_scores


class FixedScores:
    """Scores item j for user u as table[u, j] (user index read from the batch)."""

    max_len = None

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def score_all(self, batch):
        return self.table[batch["user_idx"]]


def _rows(n_users, n_items, seed=0):
    rng = np.random.default_rng(seed)
    hist = [rng.integers(0, n_items, size=rng.integers(1, 6)) for _ in range(n_users)]
    return EvalRows(np.arange(n_users), hist, rng.integers(0, n_items, size=n_users))


def test_pad_histories_keeps_most_recent():
    padded, lengths = pad_histories([np.array([1, 2, 3, 4]), np.array([7])], max_len=2)
    assert padded.tolist() == [[3, 4], [7, PAD]]
    assert lengths.tolist() == [2, 1]
    batch = make_batch([np.array([1, 2, 3]), np.array([], dtype=np.int64)])
    assert last_items(batch).tolist() == [3, PAD]


def test_chunked_equals_single_chunk():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(37, 50)).round(1)  # rounding creates ties
    rows = _rows(37, 50)
    model = FixedScores(table)
    one = evaluate(model, rows, 50, EvalSettings(max_batch_size=1000))
    many = evaluate(model, rows, 50, EvalSettings(max_batch_size=4))
    assert one.metrics == pytest.approx(many.metrics)
    np.testing.assert_array_equal(one.pes_ranks, many.pes_ranks)
    assert (one.pes_ranks >= one.opt_ranks).all()


def test_chunk_size_respects_memory_budget():
    settings = EvalSettings(memory_budget_mb=64, max_batch_size=4096)
    chunk = chunk_size_for(400_000, settings)
    assert chunk * 400_000 * 4 <= 64 * 2**20
    assert chunk >= 1


def test_mask_history_keeps_target():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    batch = {"history": torch.tensor([[0, 2, PAD]]), "target": torch.tensor([2])}
    masked = mask_history_scores(scores, batch)
    assert masked[0, 0] == float("-inf")
    assert masked[0, 2] == 3.0  # the target stays rankable even though it is in the history
    assert masked[0, 1] == 4.0


def test_wrong_shape_is_an_error():
    class Bad:
        max_len = None

        def score_all(self, batch):
            return torch.zeros(len(batch["history"]), 3)

    with pytest.raises(ValueError, match="expected"):
        evaluate(Bad(), _rows(4, 10), 10)


def test_mostpop_and_lir_by_hand():
    counts = np.array([0, 5, 3, 3, 1], dtype=float)
    rows = EvalRows(np.arange(3), [np.array([4]), np.array([1, 2]), np.array([0])], np.array([2, 2, 0]))
    res = evaluate(MostPop(counts), rows, 5)
    # target 2 ties with item 3 behind item 1: opt rank 2, pes rank 3; target 0 is last: rank 5 both
    assert res.opt_ranks.tolist() == [2, 2, 5]
    assert res.pes_ranks.tolist() == [3, 3, 5]
    lir = evaluate(LastItemRepeater(5), rows, 5)
    # row 0: last item 4, target 2 tied with 3 others at 0 -> opt 2, pes 5; row 1: last item 2 = target -> 1
    assert lir.opt_ranks.tolist() == [2, 1, 1]
    assert lir.pes_ranks.tolist() == [5, 1, 1]


def test_item_transition_by_hand():
    # training sequences: 0->1 twice, 0->2, 1->2, 3->0, 2->0; popularity 0:4, 1:2, 2:2, 3:1, 4:0 (never seen)
    seqs = [np.array([0, 1, 2]), np.array([0, 1]), np.array([3, 0, 2, 0])]
    counts = np.bincount(np.concatenate(seqs), minlength=5).astype(float)
    model = ItemTransition(5, seqs, counts)
    batch = {"history": torch.tensor([[3, 0], [1, -1], [4, -1], [-1, -1]]), "lengths": torch.tensor([2, 1, 1, 0])}
    scores = model.score_all(batch)
    backoff = np.array([0.8, 0.4, 0.4, 0.2, 0.0])  # counts / (max + 1): below one transition
    expected = np.tile(backoff, (4, 1))
    expected[0, 1] += 2; expected[0, 2] += 1  # after 0: 1 twice, 2 once
    expected[1, 2] += 1  # after 1: 2
    assert np.allclose(scores.numpy(), expected)  # rows 2 (no successors) and 3 (no history): popularity only
    rows = EvalRows(np.arange(3), [np.array([3, 0]), np.array([1]), np.array([4])], np.array([2, 0, 1]))
    res = evaluate(model, rows, 5)
    # row 0: 1 (2.8) > 2 (1.8) -> 2; row 1: 2 (1.4) > 0 (0.8) -> 2; row 2: popularity, 0 (0.8) first, then 1 and 2
    # tied at 0.4 -> opt 2, pes 3
    assert res.opt_ranks.tolist() == [2, 2, 2] and res.pes_ranks.tolist() == [2, 2, 3]
