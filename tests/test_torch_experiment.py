"""The torch experiment of ``dsa-ref train-indexer --backend``: both training stages of the indexer on
the torch ops, run here at tiny sizes on torch CPU tensors through the NumPy reference."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dsa_ref import cli  # noqa: E402
from dsa_ref.layer import DSAConfig  # noqa: E402
from dsa_ref.torch import DSAAttention  # noqa: E402
from dsa_ref.torch import experiment  # noqa: E402

SEQ_LEN, TOPK = 24, 6
CONFIG = DSAConfig.tiny(max_seq_len=64, index_topk=TOPK)


@pytest.fixture(scope="module")
def result():
    return experiment.indexer_training_experiment(backend="numpy", seq_len=SEQ_LEN, topk=TOPK, dense_steps=8,
                                                  steps=6, train_sequences=2, eval_sequences=1, learning_rate=1e-2,
                                                  eval_every=4, config=CONFIG)


def test_both_stages_raise_the_captured_mass(result):
    assert result["steps"] == [0, 4, 8, 12, 14]  # every 4 steps, the start of the sparse stage, the end
    assert result["stage"] == ["dense", "dense", "sparse", "sparse", "sparse"]
    mass, loss = result["train_mass"], result["loss"]
    assert loss[1] < 0.7 * loss[0], loss  # the warm-up's KL (eq. 3) falls
    assert loss[-1] < loss[2], loss  # and the sparse stage's (eq. 4)
    assert mass[-1] > mass[0] + 0.1, mass
    assert mass[-1] <= result["references"]["train"]["oracle"] + 1e-6
    assert all(0.0 <= m <= 1.0 + 1e-6 for m in mass + result["eval_mass"])
    assert result["seconds_per_step"]["dense"] > 0 and result["seconds_per_step"]["sparse"] > 0


def test_the_losses_are_the_layers_own():
    """At sharpness 1 the experiment's losses are DSAAttention's eq. 3 (dense mode) and eq. 4 (its
    selection), per query: the experiment only caches what the frozen main attention gives."""
    layer = experiment.build_layer(CONFIG, seed=3, backend="numpy", device="cpu")
    x = torch.randn(SEQ_LEN, CONFIG.dim, generator=torch.Generator().manual_seed(0))
    sequence = experiment.prepare_sequence(layer, x, sm_scale=CONFIG.softmax_scale, attention_dtype=torch.float32)
    dense_layer = DSAAttention(CONFIG, seed=3, mode="dense", backend="numpy")
    torch.testing.assert_close(experiment.dense_loss(layer, sequence) * SEQ_LEN, dense_layer.indexer_loss(x),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(experiment.sparse_loss(layer, sequence, sm_scale=CONFIG.softmax_scale) * SEQ_LEN,
                               layer.indexer_loss(x), rtol=1e-4, atol=1e-6)


def test_only_the_indexer_learns():
    layer = experiment.build_layer(CONFIG, seed=0, backend="numpy", device="cpu")
    x = torch.randn(SEQ_LEN, CONFIG.dim, generator=torch.Generator().manual_seed(1))
    sequence = experiment.prepare_sequence(layer, x, sm_scale=2 * CONFIG.softmax_scale, attention_dtype=torch.float32)
    experiment.sparse_loss(layer, sequence, sm_scale=2 * CONFIG.softmax_scale).backward()
    for name, parameter in layer.named_parameters():
        if name.startswith("indexer."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_dense_target_covers_every_visible_key():
    layer = experiment.build_layer(CONFIG, seed=0, backend="numpy", device="cpu")
    x = torch.randn(SEQ_LEN, CONFIG.dim, generator=torch.Generator().manual_seed(2))
    target = experiment.prepare_sequence(layer, x, sm_scale=CONFIG.softmax_scale,
                                         attention_dtype=torch.float32).dense_target
    torch.testing.assert_close(target.sum(dim=1), torch.ones(SEQ_LEN))
    visible = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()
    assert bool((target[~visible] == 0).all()) and bool((target[visible] > 0).all())


def test_captured_mass_and_references():
    n, k = 5, 2
    target = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1.0)[:, None]  # uniform over the visible keys
    target[4] = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2])
    indices = torch.tensor([[0, -1], [0, 1], [2, 1], [3, -1], [0, 4]], dtype=torch.int32)
    torch.testing.assert_close(experiment.captured_mass(target, indices), torch.tensor([1, 1, 2 / 3, 1 / 4, 0.7]))
    rows = torch.arange(n) >= k
    refs = experiment.reference_masses(target, k, rows)
    np.testing.assert_allclose(refs["random"], np.mean([2 / 3, 2 / 4, 2 / 5]))
    np.testing.assert_allclose(refs["recent_window"], np.mean([2 / 3, 2 / 4, 0.3]))
    np.testing.assert_allclose(refs["oracle"], np.mean([2 / 3, 2 / 4, 0.7]))


def test_progress_is_one_line_on_a_terminal_and_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = experiment.Progress(10, stream=stream, every=4)
        for done in range(1, 11):
            progress.update(done, f"KL {done}")
    assert terminal.getvalue().count("\n") == 1 and terminal.getvalue().count("\r") == 10
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]


def test_cli_runs_both_stages_and_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "results"
    status = cli.main(["train-indexer", "--backend", "numpy", "--quick", "--tokens", "16", "--topk", "4",
                       "--dense-steps", "2", "--steps", "2", "--train-sequences", "1", "--eval-sequences", "1",
                       "--eval-every", "1", "--progress-every", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "mass (train)" in captured.out and "4/4" in captured.err
    history = json.loads((out / experiment.JSON_NAME).read_text())
    assert history["steps"] == [0, 1, 2, 3, 4] and history["stage"] == ["dense"] * 2 + ["sparse"] * 3
    assert history["settings"]["topk"] == 4 and history["settings"]["backend"] == "numpy"
    assert (out / experiment.PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("arguments, message", [
    (["--tokens", "16", "--topk", "16"], "topk=16 must be < seq_len=16"),
    (["--dense-steps", "0", "--steps", "0"], "dense_steps + steps must be >= 1"),
    (["--steps", "-1"], "steps must be an int >= 0"),
    (["--lr", "0"], "learning_rate must be a finite number > 0"),
    (["--heads", "0"], "--heads must be >= 1"),
    (["--progress-every", "0"], "--progress-every must be >= 1"),
    (["--checkpoint", "missing.safetensors", "--heads", "8"], "--dim and --heads come from the checkpoint"),
])
def test_cli_bad_arguments(arguments, message, capsys):
    assert cli.main(["train-indexer", "--backend", "numpy", "--quick", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_cli_unknown_backend_and_torch_options_without_backend(capsys):
    assert cli.main(["train-indexer", "--backend", "no-such-backend"]) == 2
    assert "'no-such-backend' is not a valid dsa_ref backend" in capsys.readouterr().err
    assert cli.main(["train-indexer", "--dense-steps", "5"]) == 2
    assert "--dense-steps need --backend" in capsys.readouterr().err


def test_function_checks_its_arguments():
    with pytest.raises(ValueError, match="config.index_topk=8 must equal topk=4"):
        experiment.indexer_training_experiment(backend="numpy", seq_len=16, topk=4, dense_steps=1, steps=1,
                                               train_sequences=1, eval_sequences=1, learning_rate=1e-2,
                                               config=DSAConfig.tiny())
    with pytest.raises(ValueError, match="train_sequences must be an int >= 1"):
        experiment.indexer_training_experiment(backend="numpy", seq_len=16, topk=4, dense_steps=1, steps=1,
                                               train_sequences=0, eval_sequences=1, learning_rate=1e-2)
