"""Evaluation protocols: augmentation, test-time fine-tuning, and learning-rate selection without test labels."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from episodes.episode import Episode, Split, Support
from metabench.backbones import create_backbone
from metabench.config import EvalConfig, FineTuneSettings, load_config
from metabench.engine import EvalContext, evaluate
from metabench.finetuning import EvalProtocol, FineTuneOptions, fine_tune, merge_adapters, plan_protocols, prepare
from metabench.learners import create_learner
from metabench.lr_selection import LrSelector, score_lrs, split_support
from metabench.nn.diff_augment import diff_augment, translate
from metabench.nn.heads import class_prototypes
from metabench.results import load_run
from metabench.runs import eval_saved_run, execute


def _learner(name: str = "pre"):
    torch.manual_seed(0)
    return create_learner(name, create_backbone("vit_test")).eval()


def _square_task(seed: int, shots: int = 8, queries: int = 4, size: int = 32) -> Episode:
    """2-way: a white square at the left or the right edge of uniform noise; a random ViT barely sees it."""
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(2).repeat_interleave(n)
        x = torch.rand(len(y), 3, size, size, generator=g) * 255
        for i, label in enumerate(y.tolist()):
            row = int(torch.randint(0, size - 8, (1,), generator=g))
            col = 2 if label == 0 else size - 10
            x[i, :, row:row + 8, col:col + 8] = 255
        return x.to(torch.uint8), y

    (sx, sy), (qx, qy) = images(shots), images(queries)
    return Episode(sx, sy, qx, qy, "squares", Split.TEST, f"sq{seed}")


# --- protocols and options -------------------------------------------------------------------------


def test_plan_protocols_crosses_modes_and_steps() -> None:
    plan = plan_protocols(["zero_shot", "full", "lora"], [0, 50])
    assert plan == [EvalProtocol("zero_shot", 0), EvalProtocol("full", 50), EvalProtocol("lora", 50)]
    assert [p.label for p in plan_protocols(["full"], [10, 50])] == ["full@10", "full@50"]
    assert plan_protocols(["zero_shot"], [50]) == [EvalProtocol("zero_shot", 0)]
    with pytest.raises(ValueError, match="no positive step count"):
        plan_protocols(["full"], [0])
    with pytest.raises(ValueError, match="Unknown evaluation mode"):
        plan_protocols(["ful"], [5])


def test_options_come_from_the_shared_eval_config_fields() -> None:
    assert issubclass(EvalConfig, FineTuneSettings) and issubclass(FineTuneOptions, FineTuneSettings)
    shared = {f.name for f in dataclasses.fields(FineTuneSettings)}
    assert {"optimizer", "augment", "lora_rank", "lora_target", "lora_lr_scale", "batch_size"} <= shared
    ev = dataclasses.replace(EvalConfig(), optimizer="sgd", lora_rank=4, lr=3e-4)
    opts = FineTuneOptions.from_eval(ev, seed=7)
    assert (opts.optimizer, opts.lora_rank, opts.lr, opts.seed) == ("sgd", 4, 3e-4, 7)
    assert all(getattr(opts, k) == getattr(ev, k) for k in shared)
    assert FineTuneOptions.from_eval(EvalConfig()).lr == FineTuneOptions().lr  # eval.lr unset: the default rate


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.modes=[full]", "eval.steps=0"], "eval.steps to a positive number"),
        (["eval.lr_selection=fixed"], "needs a learning rate"),
        (["eval.lr_selection=suport"], 'not "suport"; did you mean "support"?'),
        (["eval.optimizer=adamax"], 'Config key "eval.optimizer" in the key=value overrides must be one of'),
        (["eval.augment_prob=1.5"], "must be a probability"),
        (["eval.lr_grid=[]"], "non-empty grid"),
    ],
)
def test_bad_fine_tuning_config(overrides: list[str], message: str) -> None:
    from metabench.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_config(overrides=overrides)


# --- augmentation ----------------------------------------------------------------------------------


def test_diff_augment_is_seeded_and_shape_preserving() -> None:
    x = torch.rand(6, 3, 16, 16)
    a = diff_augment(x, torch.Generator().manual_seed(1))
    b = diff_augment(x, torch.Generator().manual_seed(1))
    c = diff_augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(diff_augment(x, torch.Generator(), prob=0.0, flip_prob=0.0), x)
    assert torch.equal(diff_augment(x, torch.Generator(), prob=0.0, flip_prob=1.0), x.flip(3))
    with pytest.raises(TypeError, match="float images"):
        diff_augment((x * 255).to(torch.uint8), torch.Generator())


def test_translate_shifts_content_and_fills_zeros() -> None:
    x = torch.zeros(200, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = translate(x, torch.Generator().manual_seed(0), ratio=0.25)  # shifts of -2..2 pixels
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(200))  # the dot never leaves an 8x8 image here
    rows, cols = (out[:, 0] == 1).nonzero()[:, 1:].T
    assert set((rows - 4).tolist()) == set(range(-2, 3)) and set((cols - 4).tolist()) == set(range(-2, 3))


# --- fine-tuning -----------------------------------------------------------------------------------


def test_fine_tune_leaves_the_model_alone_and_lr_zero_is_zero_shot() -> None:
    learner = _learner()
    ep = _square_task(0)
    before = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    tuned = fine_tune(learner, learner.backbone, ep.support, mode="full", steps=2, options=FineTuneOptions(lr=1e-3))
    assert tuned is not learner.backbone and not tuned.training
    assert all(torch.equal(before[k], v) for k, v in learner.backbone.state_dict().items())
    assert fine_tune(learner, learner.backbone, ep.support, mode="full", steps=2,
                     options=FineTuneOptions(lr=0.0)) is learner.backbone


def test_lora_trains_far_fewer_parameters_and_never_the_patch_embedding() -> None:
    backbone = _learner().backbone
    full, full_params = prepare(backbone, "full", FineTuneOptions())
    lora, lora_params = prepare(backbone, "lora", FineTuneOptions())
    n_full, n_lora = sum(p.numel() for p in full_params), sum(p.numel() for p in lora_params)
    assert n_full == sum(p.numel() for p in backbone.parameters())
    assert 0 < n_lora < n_full / 4  # 8 adapted 48-wide layers, rank 8, on a 2-block test ViT
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any("patch_embed" in n for n in trainable)
    with pytest.raises(ValueError, match="matches no layer"):
        prepare(backbone, "lora", FineTuneOptions(lora_target=r"no\.such\.layer"))


def _support_accuracy(learner, model, ep: Episode) -> float:
    with torch.no_grad():
        feats = model(ep.support_x).float()
        logits = learner.logits(feats, class_prototypes(feats, ep.support_y, ep.way))
    return (logits.argmax(-1) == ep.support_y).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_fine_tuning_improves_support_fit(seed: int) -> None:
    learner = _learner()
    ep = _square_task(seed)
    options = FineTuneOptions(lr=1e-3, augment=False)
    zero_shot = _support_accuracy(learner, learner.backbone, ep)
    full = _support_accuracy(learner, fine_tune(learner, learner.backbone, ep.support, mode="full", steps=10,
                                                options=options), ep)
    lora = _support_accuracy(learner, fine_tune(learner, learner.backbone, ep.support, mode="lora", steps=10,
                                                options=options), ep)
    assert zero_shot < 0.9  # the random test ViT does not separate the classes zero-shot
    assert full == 1.0 and lora > zero_shot


def test_merging_a_lora_learner_keeps_its_function() -> None:
    learner = _learner("lora")
    with torch.no_grad():
        for name, p in learner.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_()  # non-zero adapters, so merging has something to fold in
    x = torch.rand(3, 3, 32, 32)
    merged = merge_adapters(copy.deepcopy(learner.backbone))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(learner.backbone(x), merged(x), atol=1e-5)


# --- learning-rate selection -----------------------------------------------------------------------


def test_split_support_holds_out_half_of_each_class() -> None:
    support = Support(torch.zeros(7, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, 1, 1, 2]))
    inner, held_x, held_y = split_support(support)
    assert inner.y.tolist() == [0, 0, 1, 2] and held_y.tolist() == [0, 0, 1]
    assert split_support(Support(torch.zeros(3, 3, 4, 4), torch.tensor([0, 1, 2]))) is None


def _run_and_record(learner, episode: Episode) -> tuple[list[torch.Tensor], dict]:
    """Evaluate one episode with support-set lr selection; every logits tensor predict returned, and the record."""
    seen: list[torch.Tensor] = []
    predict = learner.predict

    def recording(state, x):
        out = predict(state, x)
        seen.append(out.detach().clone())
        return out

    learner.predict = recording
    selector = LrSelector("support", FineTuneOptions(), [0.0, 1e-3, 1e-2])
    ctx = EvalContext("r", "pre", "vit_test", {})
    rows = list(evaluate(learner, [episode], ctx, protocols=[EvalProtocol("full", 2), EvalProtocol("lora", 2)],
                         device=torch.device("cpu"), selector=selector, progress=False))
    del learner.predict
    assert len(rows) == 2
    return seen, selector.record()


def test_lr_selection_never_reads_test_query_labels() -> None:
    learner = _learner()
    ep = _square_task(3, shots=4, queries=6)
    poisoned = dataclasses.replace(ep, query_y=ep.query_y.flip(0))  # same images, other labels
    assert not torch.equal(poisoned.query_y, ep.query_y)
    logits_a, record_a = _run_and_record(learner, ep)
    logits_b, record_b = _run_and_record(learner, poisoned)
    assert record_a == record_b and record_a["protocols"]["full@2"]["squares"]["method"] == "support"
    assert len(logits_a) == len(logits_b) and all(torch.equal(a, b) for a, b in zip(logits_a, logits_b))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_lr_zero_candidate_is_exactly_zero_shot(mode: str) -> None:
    """lr 0 skips its steps; taking them would change nothing (BatchNorm statistics stay frozen)."""
    learner, ep = _learner(), _square_task(5)
    task = (ep.support, ep.query_x, ep.query_y)
    skipped = score_lrs(learner, [task], protocol=EvalProtocol(mode, 3), options=FineTuneOptions(), grid=[0.0])
    state = learner.adapt(ep.support, mode=mode, steps=3, options=FineTuneOptions().with_lr(0.0))
    logits = learner.predict(state, ep.query_x)
    taken = ((logits.argmax(-1) == ep.query_y).float().mean().item(), F.cross_entropy(logits, ep.query_y).item())
    assert skipped[0.0][0] == taken[0] and skipped[0.0][1] == pytest.approx(taken[1], abs=1e-5)


def test_validation_selection_refuses_test_episodes() -> None:
    selector = LrSelector("valid", FineTuneOptions(), [0.0, 1e-3])
    with pytest.raises(ValueError, match="validation-split episodes only"):
        selector.fit_on_validation(_learner(), "squares", EvalProtocol("full", 1), [_square_task(0)])
    fixed = LrSelector("support", FineTuneOptions(), [0.0], fixed=1e-4)
    assert fixed.method == "fixed"
    assert fixed.lr_for(_learner(), "s", _square_task(0).support, EvalProtocol("full", 1)) == 1e-4


# --- end to end ------------------------------------------------------------------------------------

FAST = ["data.image_size=32", "eval.episodes=1", "data.eval_sources=[noto,digits]", "data.sampler.mode=fixed",
        "data.sampler.use_bilevel_hierarchy=false", "data.sampler.way=3", "data.sampler.shot=2", "data.sampler.query=2", "eval.lr_grid=[0,1e-3]",
        "eval.lr_valid_episodes=1", "eval.steps=1"]


def test_eval_saved_run_adds_fine_tuning_protocols(tmp_path: Path) -> None:
    cfg = load_config(overrides=[*FAST, f"out_dir={tmp_path}"], flags={"learner": {"name": "finetune"},
                                                                       "backbone": {"name": "vit_test"}})
    run_dir = execute(cfg, progress=False).run_dir
    manifest, frame = load_run(run_dir)
    assert manifest["protocols"] == ["full@1"]  # finetune's default protocol, eval.modes unset
    assert set(zip(frame["mode"], frame["steps"])) == {("full", 1)}
    chosen = manifest["lr_selection"]["protocols"]["full@1"]
    assert chosen["noto"]["method"] == "valid" and chosen["digits"]["method"] == "support"  # digits: no valid split

    eval_saved_run(run_dir, [], modes=["zero_shot", "full", "lora"], steps=[0, 2], progress=False)
    manifest, frame = load_run(run_dir)
    assert set(zip(frame["mode"], frame["steps"])) == {("full", 1), ("zero_shot", 0), ("full", 2), ("lora", 2)}
    assert len(frame) == 4 * 2
    assert manifest["evaluations"][-1]["protocols"] == ["zero_shot", "full@2", "lora@2"]
    assert {"full@1", "full@2", "lora@2"} <= set(manifest["lr_selection"]["protocols"])
    json.dumps(manifest)  # the record stays JSON
