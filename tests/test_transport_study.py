"""05's bookkeeping: the compressed encoding chosen on validation and scored once on test, the
Pareto front, plot groups, and the chosen encoding found back."""

import pandas as pd
import pytest

from fedrefine_lib import transport_study as ts
from fedrefine_lib.evaluate import McqResult
from fedrefine_lib.transport import Encoding

REF = "kv main · bfloat16"


def table(acc: dict[str, float]) -> pd.DataFrame:
    sizes = {"standalone": 0, REF: 1000, "kv main · int8, 1 layers": 200, "kv main · int4, 1 layers": 100}
    return pd.DataFrame(
        [
            {"option": o, "fuser": None if o == "standalone" else "main", "bytes_per_query": sizes[o], "accuracy": a}
            for o, a in acc.items()
        ]
    )


def result(correct: list[bool], domain: str = "geo") -> McqResult:
    n = len(correct)
    return McqResult("loglik", [f"q{i}" for i in range(n)], ["A"] * n, ["A"] * n, correct, domains=[domain] * n)


def test_the_choice_is_made_on_validation_and_scored_once_on_test():
    val = table({"standalone": 0.2, REF: 0.8, "kv main · int8, 1 layers": 0.8, "kv main · int4, 1 layers": 0.7})
    choice = ts.compressed_choice(val, REF)
    assert choice["chosen"] == "kv main · int8, 1 layers" and choice["bytes_fraction"] == 0.2
    assert choice["val_loss"] == 0 and choice["within_max_loss"]
    assert ts.compressed_choice(val, REF, max_fraction=0.05)["chosen"] is None
    test_table = table({"standalone": 0.0, REF: 0.75, "kv main · int8, 1 layers": 0.5, "kv main · int4, 1 layers": 1})
    results = {REF: result([True, True, True, False]), "kv main · int8, 1 layers": result([True, False, True, False])}
    scored = ts.score_choice(choice, ts.Measured(test_table, {}, results), ["geo"])
    assert scored["chosen"] == choice["chosen"]  # test never changes the choice (int4 wins on test here)
    assert scored["test_loss"] == pytest.approx(0.25) and scored["test_bytes_fraction"] == pytest.approx(0.2)
    assert scored["paired_test"].diff == pytest.approx(-0.25) and scored["paired_test"].n == 4
    assert "test_loss" not in ts.score_choice({"reference": REF, "chosen": None}, ts.Measured(test_table, {}, {}), [])


def test_pareto_groups_and_the_chosen_encoding():
    t = table({"standalone": 0.2, REF: 0.8, "kv main · int8, 1 layers": 0.8, "kv main · int4, 1 layers": 0.1})
    assert ts.pareto(t)["option"].tolist() == ["standalone", "kv main · int8, 1 layers"]
    assert ts.with_groups(t)["group"].tolist() == ["standalone", "kv main", "kv main", "kv main"]
    encodings = [Encoding("bfloat16"), Encoding("int8", layers=(3,))]
    assert ts.encoding_chosen({"chosen": "kv main · int8, 1 layers"}, encodings) == Encoding("int8", layers=(3,))
    assert ts.encoding_chosen({"chosen": None}, encodings) == Encoding("bfloat16")
    with pytest.raises(KeyError, match="none of fuser 'main'"):
        ts.encoding_chosen({"chosen": "kv main · int4, 1 layers"}, encodings)
