import pytest

from slim_edge.evals.generation import generation_check, repeat_rate, tail_loop_period


def test_repeat_rate_exact():
    assert repeat_rate(list(range(20))) == 0.0
    assert repeat_rate([1, 2, 3]) == 0.0  # no 4-gram at all
    # 1 2 3 4 1 2 3 4 1 2: 7 four-grams, the last 3 repeat the first 3
    assert repeat_rate([1, 2, 3, 4, 1, 2, 3, 4, 1, 2]) == pytest.approx(3 / 7)
    # a constant run of 10: 7 four-grams, all but the first repeat
    assert repeat_rate([5] * 10) == pytest.approx(6 / 7)
    assert repeat_rate([1, 2, 1, 2, 1], n=2) == pytest.approx(2 / 4)


def test_tail_loop_period_exact():
    assert tail_loop_period(list(range(40))) == 0
    assert tail_loop_period(list(range(10)) + [7] * 16) == 1
    assert tail_loop_period(list(range(10)) + [7] * 15) == 0  # a run shorter than 16 is not a loop
    assert tail_loop_period([9, 9] + [1, 2, 3, 4, 5] * 4) == 5  # 20 tokens >= max(3·5, 16)
    assert tail_loop_period([1, 2, 3, 4, 5, 6, 7] * 2 + [1, 2]) == 0  # only ~2 repeats of period 7
    assert tail_loop_period([1, 2] * 8) == 2


class _FakeLM:
    name, add_bos, bos_id = "fake", True, 1

    def tokenize(self, text):
        return [ord(c) for c in text[:3]]

    def detokenize(self, ids):
        return " ".join(map(str, ids))

    def greedy(self, prompt, n):
        assert prompt[0] == 1 and len(prompt) == 4
        return [7] * n if prompt[1] == ord("T") else list(range(n))


def test_generation_check_aggregates():
    r = generation_check(_FakeLM(), 20, prompts=("The", "abc"), progress=False)
    assert r["loops"] == 1
    assert r["repeat_rate"] == pytest.approx((16 / 17 + 0) / 2)
    assert r["continuations"][0]["loop_period"] == 1
