"""Aggressive training on sentences (He et al. 2019): the inner loop's stopping rule compares the
loss per word, so batches of long sentences do not read as the guide getting worse."""

import torch

from pyrovae.train.strategies import AggressiveGuideUpdates, tokens_per_row


def test_tokens_per_row_turns_a_loss_per_sentence_into_one_per_word():
    lengths = torch.tensor([3, 5, 4])
    assert float(tokens_per_row({"lengths": lengths})) == 3 / 12
    assert float(tokens_per_row({"mask": torch.arange(5) < lengths.unsqueeze(-1)})) == 3 / 12
    assert tokens_per_row({"x": torch.zeros(3, 4)}) == 1.0


def test_the_inner_loop_reads_per_word_losses_across_batches_of_different_lengths():
    # Per sentence the loss doubles with a batch twice as long; per word it falls: the loop goes on.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [parameter], "name": "guide"}, {"params": [], "name": "model"}], lr=0.0)
    batches = iter([{"lengths": torch.tensor([10, 10])}] * 2 + [{"lengths": torch.tensor([20, 20])}] * 2 + [{"lengths": torch.tensor([20, 20])}] * 2)
    per_sentence = iter([30.0, 30.0, 50.0, 50.0, 60.0, 60.0])

    def step_on(batch):
        loss = (parameter * 0).sum() + next(per_sentence)
        loss.backward()
        return loss.detach() * tokens_per_row(batch)

    strategy = AggressiveGuideUpdates(check_every=2, max_steps=6, mi_examples=2)
    first = next(batches)
    # Per word: 1.5, 1.5 | 1.25, 1.25 | 1.5, 1.5 -> falls after the second window, stops at the third.
    assert strategy.guide_steps(step_on, first, lambda: next(batches), optimizer, clip=float("inf")) == 6


def test_the_guide_only_steps_replay_the_compiled_step_and_train_as_the_eager_ones_do():
    from pyrovae.train.step import Step
    from tests.test_train_parts import state_dicts, tiny_training

    results = {}
    for mode in ("none", "trace"):
        training = tiny_training(compile=mode, strategy="aggressive", aggressive_check_every=2, aggressive_max_steps=4)
        step = Step.for_training(training)
        torch.manual_seed(5)
        for batch in list(training.data.batches("train", 16))[:4]:
            step(batch)
        results[mode] = (state_dicts(training), step)
    eager, compiled = results["none"][0], results["trace"][0]
    step = results["trace"][1]
    assert step.compiled.active and step.compiled.graphs  # captured, checked against eager, kept
    # Guide-only steps (model frozen) and model steps (guide frozen) are captured apart.
    assert {key[-1] for key in step.compiled.graphs} == {(True, False), (False, True)}
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_sentence_vae_with_word_dropout_is_captured_by_the_compiled_step(capsys):
    # Word dropout's keep rate is a 0-dim tensor input of the captured graph: no Python branch reads it.
    from pyrovae.objectives import MeanFieldELBO
    from pyrovae.schedules import Constant
    from pyrovae.train import TrainConfig, fit
    from tests.test_sentence_vae import tiny_data, vae_pair

    torch.manual_seed(0)
    data = tiny_data()
    model, guide = vae_pair(data)
    config = TrainConfig(epochs=2, batch_size=8, compile="trace", strategy="aggressive", aggressive_check_every=2, aggressive_max_steps=4, aggressive_mi_examples=8)
    fit(model, guide, MeanFieldELBO(), data, config, inputs={"word_keep": Constant(0.8)}, progress=False)
    assert "running the step eagerly" not in capsys.readouterr().err


def test_a_guide_only_step_runs_the_output_layer_as_one_matrix_product_and_gives_the_full_steps_guide_gradients():
    # With the model frozen, nn.Linear on (rows, T, F) features broadcasts its weight to every row
    # and runs a batched product (about 3x slower on the CPU); on flat (rows, F) features it stays
    # a matrix product, forward and backward, and no decoder weight gradient is computed.
    from torch.profiler import ProfilerActivity, profile

    from pyrovae.objectives import MeanFieldELBO
    from pyrovae.train.strategies import frozen
    from tests.test_sentence_vae import tiny_data, vae_pair

    torch.manual_seed(0)
    data = tiny_data()
    model, guide = vae_pair(data)
    batch = next(iter(data.batches("train", 16)))
    vocabulary = data.spec.num_categories
    with frozen(list(model.parameters())), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiled:
        torch.manual_seed(1)
        loss, _ = MeanFieldELBO()(model, guide, batch)
        loss.backward()
    decoder_width = model.decoder.lstm.input_size  # words and z: the encoder's LSTM reads words only
    onednn_decoder_backward = [
        event for event in profiled.events() if event.name == "aten::mkldnn_rnn_layer_backward" and event.input_shapes[0][-1:] == [decoder_width]
    ]
    assert not onednn_decoder_backward  # the frozen decoder LSTM ran the native kernel, whose backward skips weights
    products = [event for event in profiled.events() if event.name in ("aten::mm", "aten::addmm", "aten::bmm")]
    over_words = [event for event in products if any(vocabulary in shape for shape in event.input_shapes if shape)]
    assert over_words and all(event.name != "aten::bmm" for event in over_words)
    assert all(p.grad is None for p in model.parameters())
    frozen_gradients = {name: p.grad.clone() for name, p in guide.named_parameters() if p.requires_grad}
    assert len(frozen_gradients) == len([p for p in guide.parameters() if p.requires_grad])

    # The frozen step (native LSTM kernel, sliced output layer) gives the guide the gradients the
    # full step (oneDNN LSTM, weights trained) gives it, on the same draws.
    guide.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiled:
        loss, _ = MeanFieldELBO()(model, guide, batch)
        loss.backward()
    assert any(event.name == "aten::mkldnn_rnn_layer_backward" and event.input_shapes[0][-1:] == [decoder_width] for event in profiled.events())
    for name, p in guide.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, frozen_gradients[name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch.backends.mkldnn.enabled  # switched back after the frozen step


def test_the_native_lstm_switch_puts_torchs_flag_back_after_an_error_and_leaves_an_unset_flag_alone():
    from pyrovae.nn.sequence import _without_weight_gradients_on_cpu

    lstm = torch.nn.LSTM(3, 4)
    lstm.requires_grad_(False)
    try:
        with _without_weight_gradients_on_cpu(lstm) as native:
            assert native and not torch.backends.mkldnn.enabled
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.backends.mkldnn.enabled
    with torch.backends.mkldnn.flags(enabled=False), _without_weight_gradients_on_cpu(lstm) as native:
        assert not native and not torch.backends.mkldnn.enabled
    lstm.requires_grad_(True)
    with _without_weight_gradients_on_cpu(lstm) as native:
        assert not native and torch.backends.mkldnn.enabled
