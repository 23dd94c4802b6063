"""06's bookkeeping on crafted cases: the defences per fuser, the strings per item, rephrasing
under collusion, text artefacts and the privacy-against-accuracy join."""

from types import SimpleNamespace

import pandas as pd
import pytest

from fedrefine_lib import privacy_study


class _Fuser:
    """What the defences read of a fuser: its layer map, sender layers and positions."""

    def __init__(self, layer_map, positions=None):
        self.config = SimpleNamespace(layer_map=layer_map, sender_layers=4, sender_positions=positions)


def test_defences_per_fuser_send_what_it_reads_and_name_each_change():
    plan = privacy_study.defences({"main": _Fuser([2, 3], 1), "one": _Fuser([3, 3])}, noise=(0.5,))
    names = [d.name for d in plan]
    per_fuser = ["none (float32)", "bfloat16", "int4"]
    assert names == [f"main: {n}" for n in [*per_fuser, "deeper 1 layers", "noise 0.5"]] + [
        f"one: {n}" for n in [*per_fuser, "noise 0.5"]
    ]
    assert plan[0].encoding.layers == (2, 3) and plan[3].encoding.layers == (3,) and plan[4].encoding.noise == 0.5
    assert "deeper" not in " ".join(d.name for d in privacy_study.defences({"m": _Fuser([2, 3])}, (), deeper=False))
    assert privacy_study.first_layers({"main": _Fuser([2, 3], 1)}, plan[:5]) == [2, 3]


def test_strings_collusion_and_text_rows_on_crafted_items():
    items = [
        {"private": ["Vakor"], "entity": "Plaskais"},
        {"private_context": "Ada lives in Rome.", "entity": "Ada", "answerKey": "B",
         "choices": {"label": ["A", "B"], "text": ["Oslo", "Rome"]}},
    ]  # fmt: skip
    targets = privacy_study.strings(items)
    assert targets == [{"private": ["Vakor"], "entity": ["Plaskais"]}, {"private": ["Rome"], "entity": ["Ada"]}]
    stems = ["I am Vakor. What is Plaskais?", "I am Bo. What is X?"]
    got = privacy_study.collusion(stems, ["What is Plaskais?", "What is X?"],
                                  [["What is Plaskais?", "Vakor asks"], ["q", "q"]], [["Vakor"], ["Bo"]])  # fmt: skip
    assert got == {"one rephrasing": 0.0, "distinct, per sender": 0.25, "distinct, colluding senders": 0.5}
    row = privacy_study.text_rows("a", "x -> y", "text", ["Vakor asks of Plaskais", "nothing"], targets)
    assert row["private_recovery"] == 0.5 and row["entity_recovery"] == 0.5 and row["queries"] == 2
    with pytest.raises(ValueError, match="attack_queries"):
        privacy_study.attack_rows(None, {}, [], {"original": []}, [], {})


def test_privacy_vs_accuracy_takes_the_strongest_attack_per_defence():
    attacks = pd.DataFrame([
        {"arm": "o", "defence": "d", "private_recovery": 0.2}, {"arm": "o", "defence": "d", "private_recovery": 0.7},
    ])  # fmt: skip
    accuracy = pd.DataFrame([{"arm": "o", "defence": "d", "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}])
    table = privacy_study.privacy_vs_accuracy(attacks, accuracy)
    assert table.to_dict(orient="records") == [
        {"arm": "o", "defence": "d", "private_recovery": 0.7, "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    ]
