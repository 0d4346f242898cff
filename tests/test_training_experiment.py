"""The indexer warm-up experiment: training the indexer raises the attention mass its top-k captures."""

import argparse

import numpy as np

from dsa_ref.layer import experiment
from dsa_ref.layer.training import captured_attention_mass


def test_captured_mass_bounds():
    target = np.tril(np.ones((5, 5)))
    target /= target.sum(1, keepdims=True)
    scores = np.where(np.tril(np.ones((5, 5), bool)), np.arange(5.0)[None, :], -np.inf)
    np.testing.assert_allclose(captured_attention_mass(scores, target, 5), 1.0)
    np.testing.assert_allclose(captured_attention_mass(scores, target, 2), [1, 1, 2 / 3, 2 / 4, 2 / 5])


def test_warmup_raises_captured_attention_mass():
    result = experiment.indexer_warmup_experiment(steps=30, seq_len=32, topk=4, train_sequences=2,
                                                  eval_sequences=1, learning_rate=1e-2, eval_every=10)
    mass, loss = result["train_mass"], result["loss"]
    assert result["steps"] == [0, 10, 20, 30]
    assert mass[-1] > mass[0] + 0.15, mass
    assert loss[-1] < 0.7 * loss[0], loss
    assert mass[-1] <= result["references"]["train"]["oracle"] + 1e-12


def test_cli_hook(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    experiment.add_arguments(parser)
    args = parser.parse_args(["--steps", "2", "--seq-len", "16", "--topk", "4", "--train-sequences", "1",
                              "--eval-sequences", "1", "--eval-every", "1", "--json", str(tmp_path / "h.json")])
    assert experiment.run(args) == 0
    assert "mass (train)" in capsys.readouterr().out
    assert (tmp_path / "h.json").exists()
    assert experiment.run(parser.parse_args(["--topk", "16", "--seq-len", "16"])) == 2
