"""The temporal head with learnable prompts (DFER-CLIP): sampling, clip grouping, prompt splicing, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fercache.data import FeatureSet, clip_level
from fercache.errors import ConfigError, EncoderError
from fercache.heads import HeadContext, build_head
from fercache.heads.temporal import PromptText, class_descriptions, segment_indices
from fercache.labels import CANONICAL
from fercache.loop import _optimizer, lr_scheduler, train_loop

from .conftest import class_image, write_lossless_video


def test_eval_sampling_takes_segment_middles():
    idx = segment_indices(torch.tensor([32, 16, 3]), 16, train=False)
    assert idx[0].tolist() == list(range(1, 32, 2))  # segment k of 32 frames = frames 2k, 2k+1; middle -> 2k+1
    assert idx[1].tolist() == list(range(16))
    assert idx[2].tolist() == [0] * 5 + [1] * 6 + [2] * 5  # a 3-frame clip repeats frames, in order, evenly


def test_train_sampling_stays_inside_each_segment_and_varies():
    torch.manual_seed(0)
    draws = torch.stack([segment_indices(torch.tensor([48]), 16, train=True)[0] for _ in range(200)])
    k = torch.arange(16)
    assert ((draws >= 3 * k) & (draws < 3 * (k + 1))).all()  # 48 frames: segment k is frames 3k..3k+2
    assert all(len(set(draws[:, j].tolist())) == 3 for j in range(16))  # every position of every segment is drawn


def _frames_set(clip_ids, frame_idx, labels, d=4):
    n = len(clip_ids)
    x = np.stack([np.full(d, 10 * i + f, dtype=np.float32) for i, f in zip(range(n), frame_idx)])
    arr = lambda v: np.array(v, dtype=object)  # noqa: E731
    return FeatureSet(arr([f"s{i}" for i in range(n)]), x, arr(labels), arr(["train"] * n), arr(clip_ids), None, [],
                      clip_id=arr(clip_ids), frame_idx=np.array(frame_idx))


def test_clip_level_orders_frames_pads_and_strides():
    fs = _frames_set(["b", "a", "b", "a", "a"], [2, 5, 1, 1, 3], ["sad", "happy", "sad", "happy", "happy"])
    clips = clip_level(fs)
    assert clips.sample_id.tolist() == ["a", "b"] and clips.lengths.tolist() == [3, 2]
    assert clips.label.tolist() == ["happy", "sad"]
    assert clips.x[0, :, 0].tolist() == [31.0, 43.0, 15.0]  # rows 3, 4, 1: frames 1, 3, 5 of clip a
    assert clips.x[1, :, 0].tolist() == [21.0, 2.0, 0.0]  # frames 1, 2 of clip b, then padding
    long = clip_level(_frames_set(["c"] * 9, list(range(9)), ["sad"] * 9), max_frames=3)
    assert long.lengths.tolist() == [3] and long.x[0, :, 0].tolist() == [0.0, 44.0, 88.0]  # frames 0, 4, 8


def test_clip_level_refuses_mixed_labels_and_frame_manifests():
    with pytest.raises(ConfigError, match="clip 'a' has frames with different labels"):
        clip_level(_frames_set(["a", "a"], [0, 1], ["sad", "happy"]))
    fs = _frames_set(["a"], [0], ["sad"])
    fs.clip_id = None
    with pytest.raises(ConfigError, match="no clip_id/frame_idx columns"):
        clip_level(fs)


def _order_task(n=240, d=16, frames=12, seed=0):
    """Class 0 moves from pattern a to b over the clip, class 1 from b to a: equal means, opposite order."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, d, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % 2
    t = torch.linspace(0, 1, frames)[None, :, None]
    x = torch.where(y[:, None, None] == 0, (1 - t) * a + t * b, t * a + (1 - t) * b)
    x = x + 0.3 * torch.randn(n, frames, d, generator=g)
    return {"x": x, "y": y, "lengths": torch.full((n,), frames)}


@pytest.mark.parametrize("pool,solves", [("transformer", True), ("mean", False)])
def test_transformer_sees_frame_order_that_mean_pooling_cannot(pool, solves):
    torch.manual_seed(0)
    ctx = HeadContext(16, 2, ["happy", "sad"])
    head = build_head("temporal", ctx, pool=pool, width=32, heads=4, mlp=64, segments=8)
    assert head.resolved_hp["classifier"] == "linear"  # no store with a text tower: auto -> linear
    train, val = _order_task(), _order_task(seed=1)
    head.fit_stats(train)
    recipe = {**head.spec.recipe, "epochs": 25, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "scheduler": None}
    _, history, _ = train_loop(head, train, val, recipe, "expr", ["happy", "sad"], seed=0)
    best = max(h["val_accuracy"] for h in history)
    assert best > 0.95 if solves else best < 0.7, best


def test_recipe_uses_two_learning_rates_and_multistep():
    head = build_head("temporal", HeadContext(16, 2, ["happy", "sad"], restore=True), classifier="prompts", width=32,
                      heads=4, mlp=64)
    head.prompt.ctx = torch.nn.Parameter(torch.zeros(2, 8, 32))
    opt = _optimizer(head, head.spec.recipe)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    assert opt.param_groups[1]["params"][0] is head.prompt.ctx
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    sched = lr_scheduler(opt, head.spec.recipe)
    lrs = []
    for _ in range(45):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[29] == pytest.approx(1e-2) and lrs[30] == pytest.approx(1e-3) and lrs[40] == pytest.approx(1e-4)


def test_every_canonical_class_has_a_description():
    table = class_descriptions()
    assert set(CANONICAL) == set(table) and all(len(v.split()) >= 8 for v in table.values())


def test_prompt_splice_runs_the_towers_own_text_path(tiny_clip77):
    _, model, tok = tiny_clip77
    descs = ["a face with the brows raised.", "a smiling face."]
    prompt = PromptText(model, tok, descs, n_ctx=4)
    assert prompt.slots.tolist() == [[1, 2, 3, 4]] * 2  # right after the start-of-text token
    x_id = tok(["X"])[0, 1]
    with torch.no_grad():  # context = the embedding of the placeholder "X": must equal encoding the plain text
        prompt.ctx.copy_(model.token_embedding.weight[x_id].expand(2, 4, -1))
        torch.testing.assert_close(prompt(), model.encode_text(tok(["X X X X " + d for d in descs])))
    prompt.ctx.data.normal_()
    prompt().sum().backward()
    assert prompt.ctx.grad is not None and prompt.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the text tower stays frozen
    assert set(prompt.state_dict()) == {"ctx", "tokens"}  # the tower is not saved with the head


@pytest.mark.parametrize("position,text", [("front", "{d} X X X X X"), ("middle", "X X {d} X X X"),
                                           ("end", "X X X X X {d}")])
def test_prompt_position_puts_the_description_where_asked(tiny_clip77, position, text):
    """The context-position ablation: with every context vector set to the embedding of 'X', each placement must
    encode exactly as the plain text with the description there does (classes of unequal length included)."""
    _, model, tok = tiny_clip77
    descs = ["a face with the brows raised and the eyes wide open.", "a smiling face."]
    prompt = PromptText(model, tok, descs, n_ctx=5, position=position)
    x_id = tok(["X"])[0, 1]
    with torch.no_grad():
        prompt.ctx.copy_(model.token_embedding.weight[x_id].expand(2, 5, -1))
        torch.testing.assert_close(prompt(), model.encode_text(tok([text.format(d=d) for d in descs])))


def test_shared_context_is_one_set_of_vectors_every_class_reads(tiny_clip77):
    _, model, tok = tiny_clip77
    prompt = PromptText(model, tok, ["a smiling face.", "a frowning face.", "a calm face."], n_ctx=3, shared=True)
    assert prompt.ctx.shape[0] == 1
    prompt().sum().backward()  # every class's prompt reads the one context: its gradient sums over classes
    assert prompt.ctx.grad.abs().sum() > 0
    separate = PromptText(model, tok, ["a smiling face.", "a frowning face.", "a calm face."], n_ctx=3)
    with torch.no_grad():
        separate.ctx.copy_(prompt.ctx.expand(3, -1, -1))
        torch.testing.assert_close(separate(), prompt())


def test_depth_stacks_transformer_layers_and_a_restore_rebuilds_them():
    one = build_head("temporal", HeadContext(16, 2, ["happy", "sad"]), width=32, heads=4, mlp=64)
    three = build_head("temporal", HeadContext(16, 2, ["happy", "sad"]), width=32, heads=4, mlp=64, layers=3)
    assert isinstance(one.encoder, torch.nn.TransformerEncoderLayer)  # the saved layout of published-depth runs
    assert len(three.encoder) == 3
    again = build_head("temporal", HeadContext(16, 2, ["happy", "sad"], restore=True), width=32, heads=4, mlp=64,
                       layers=3, classifier="linear")
    again.load_state_dict(three.state_dict())
    x = torch.randn(5, 7, 16)
    three.eval(), again.eval()
    torch.testing.assert_close(again(x), three(x))


@pytest.mark.parametrize("hp,error", [({"position": "start"}, "position must be"), ({"layers": 0}, "layers")])
def test_temporal_ablation_values_are_checked(hp, error):
    with pytest.raises(ConfigError, match=error):
        build_head("temporal", HeadContext(16, 2, ["happy", "sad"]), **hp)


def test_prompt_too_long_for_the_context_is_refused(tiny_clip77):
    _, model, tok = tiny_clip77
    with pytest.raises(ConfigError, match="fills the text tower's 77 tokens"):
        PromptText(model, tok, ["a face " * 40], n_ctx=8)


def test_prompt_head_trains_evaluates_restores_and_predicts(video_store, tmp_path, monkeypatch):
    from fercache.predict import predict
    from fercache.rundir import load_run
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    store, root = video_store
    from fercache.store import open_store

    assert open_store(store).info().clips == 48
    r = fit(store, "temporal", out_dir=tmp_path, recipe={"epochs": 3}, hp={"width": 32, "heads": 4, "mlp": 64})
    cfg = json.loads((r.run_dir / "config.json").read_text())
    assert cfg["hp"]["classifier"] == "prompts" and cfg["level"] == "clip" and cfg["output"] == "embedding"
    assert r.metrics["n_train"] == 24 and r.metrics["n_val"] == 12 and r.metrics["unit"] == "clips"
    saved = torch.load(r.run_dir / "head.pt", weights_only=True)["state_dict"]
    assert saved["prompt.ctx"].shape == (4, 8, 32) and not any("token_embedding" in k for k in saved)
    res = evaluate_run(r.run_dir)
    assert res["n"] == 12 and sum(map(sum, res["confusion"])) == 12
    # The restored head has no text tower: it must predict from the text features saved at selection time.
    model, _, _ = load_run(r.run_dir)
    assert model.prompt.clip is None and model.text.abs().sum() > 0
    out = predict(r.run_dir, [root / "clips" / "test_happy_0", root / "clips" / "test_sad_1"])
    assert [o["path"].rsplit("/", 1)[-1] for o in out] == ["test_happy_0", "test_sad_1"]
    assert all(o["frames"] >= 3 and abs(sum(o["probabilities"].values()) - 1) < 1e-5 for o in out)
    with pytest.raises(ConfigError, match="one clip per folder of frames or video file"):
        predict(r.run_dir, [next((root / "clips" / "test_sad_1").iterdir())])
    # the same clip as a video file: the same prediction, its frames decoded and encoded a batch at a time
    frames = [np.asarray(Image.open(f).convert("RGB")) for f in sorted((root / "clips" / "test_sad_1").iterdir())]
    video = write_lossless_video(tmp_path / "test_sad_1.mkv", frames)
    (v,) = predict(r.run_dir, [video], batch_size=2)
    assert v["frames"] == len(frames) == out[1]["frames"] and v["frames_failed"] == 0
    assert np.allclose(list(v["probabilities"].values()), list(out[1]["probabilities"].values()), atol=1e-5)
    (half,) = predict(r.run_dir, [video], every=2)
    assert half["frames"] == (len(frames) + 1) // 2
    # --window: one prediction per window of frames, each as that window alone would be predicted
    n = len(frames)
    first, last = predict(r.run_dir, [video], window=n - 1, stride=1)
    assert (first["frame"], first["time"], first["frames"]) == (1, 0.0, n - 1) and last["frame"] == 2
    (alone,) = predict(r.run_dir, [write_lossless_video(tmp_path / "head.mkv", frames[:n - 1])])
    assert np.allclose(list(first["probabilities"].values()), list(alone["probabilities"].values()), atol=1e-5)
    (whole,) = predict(r.run_dir, [video], window=n + 5)  # longer than the clip: the clip
    assert whole["frames"] == n and np.allclose(list(whole["probabilities"].values()),
                                                list(v["probabilities"].values()), atol=1e-5)
    folder = predict(r.run_dir, [root / "clips" / "test_sad_1"], window=2, stride=2)  # a folder: frame indices
    starts = [w["frame"] for w in folder]
    assert starts[0] == 1 and starts[-1] + 1 == n and all(0 < b - a <= 2 for a, b in zip(starts, starts[1:]))
    assert all(w["frames"] == 2 and w["time"] is None for w in folder)
    for kw in ({"window": 0}, {"stride": 2}):
        with pytest.raises(ConfigError, match=r"--window must be a whole number >= 1|--stride with --window"):
            predict(r.run_dir, [video], **kw)
    with monkeypatch.context() as m:  # a mistyped clip folder, said before the encoder is built
        m.setattr("fercache.predict.encoder_of", lambda *a: pytest.fail("encoder built before the inputs"))
        with pytest.raises(ConfigError, match=r"test_sad_9 is neither \(did you mean '.*/test_sad_\d'\?\)$"):
            predict(r.run_dir, [root / "clips" / "test_happy_0", root / "clips" / "test_sad_9"])
    empty = tmp_path / "empty_clip"  # a folder without a decodable frame: was a row of errors and exit 0
    (empty / "a.jpg").parent.mkdir()
    (empty / "a.jpg").write_text("not a frame")
    with pytest.raises(ConfigError, match=r"^none of the 1 clip\(s\) had a frame that could be decoded, e\.g\. "):
        predict(r.run_dir, [empty])


def test_restored_prompt_head_reproduces_its_validation_score(video_store, tmp_path):
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    store, _ = video_store
    r = fit(store, "temporal", out_dir=tmp_path, recipe={"epochs": 2}, hp={"width": 32, "heads": 4, "mlp": 64})
    assert evaluate_run(r.run_dir, split="val", write=False)["accuracy"] == pytest.approx(r.metrics["val"]["accuracy"])


def test_prompts_refused_without_text_tower_and_frames_without_clips(tiny_store, video_store, tmp_path):
    from fercache.extract import extract
    from fercache.train import fit

    with pytest.raises(ConfigError, match="faces.csv has no clip_id/frame_idx columns"):
        fit(str(tiny_store), "temporal", out_dir=tmp_path)
    _, root = video_store
    extract(root / "clips.csv", "null:", tmp_path / "null.zarr", root=root, image_size=16, workers=0, progress=False)
    with pytest.raises(EncoderError, match="the prompts classifier needs a CLIP text tower.*null:.*classifier=linear"):
        fit(str(tmp_path / "null.zarr"), "temporal", out_dir=tmp_path, hp={"classifier": "prompts"})


def test_dfew_folds_share_one_store_and_report_uar_war(tiny_encoder_spec, tmp_path):
    """Two DFEW folds (native layout) -> two manifests with one content hash -> one extraction, both folds trained."""
    from fercache.adapters import build
    from fercache.extract import extract
    from fercache.manifests import content_sha256, write_manifest
    from fercache.protocols import manifest_folds

    src, rng = tmp_path / "DFEW", np.random.default_rng(0)
    clips = [(f"{i:05d}", 1 + i % 2) for i in range(1, 17)]  # native 1 happy, 2 sad
    for clip, code in clips:
        (src / "clip_224x224" / clip).mkdir(parents=True)
        for f in range(4):
            class_image(code, rng).save(src / "clip_224x224" / clip / f"{f:03d}.jpg")
    halves = (clips[:8], clips[8:])
    manifests = []
    for fold, (train, test) in enumerate((halves, halves[::-1]), 1):
        d = src / "annotation" / f"set_{fold}"
        d.mkdir(parents=True)
        for name, part in (("train", train), ("test", test)):
            (d / f"{name}.csv").write_text("video_name,label\n" + "".join(f"{int(c)},{code}\n" for c, code in part))
        manifests.append(write_manifest(build("dfew", src, fold=fold), tmp_path / f"dfew_set{fold}.csv"))
    built = [build("dfew", src, fold=f) for f in (1, 2)]
    assert content_sha256(built[0]) == content_sha256(built[1])  # same frames, same order: one store for every fold
    extract(manifests[0], tiny_encoder_spec, tmp_path / "dfew.zarr", root=src, workers=0, progress=False)
    small = {"classifier": "linear", "width": 32, "heads": 4, "mlp": 64}
    hp = {"temporal": small, "temporal@mean": {**small, "pool": "mean"}}  # an ablation row beside the head
    r = manifest_folds(str(tmp_path / "dfew.zarr"), [str(m) for m in manifests], ["temporal", "temporal@mean"],
                       tmp_path / "folds", seeds=(0, 1), hp=hp,
                       recipe={"temporal": {"epochs": 2}, "temporal@mean": {"epochs": 2}})
    runs = r["results"]["temporal"]
    assert [(x["fold"], x["seed"]) for x in runs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(x["n"] == 8 and x["level"] == "clip" for x in runs)  # 8 test clips per fold, scored per clip
    assert ("| temporal |" in r["markdown"] and "| temporal@mean |" in r["markdown"] and "2 fold(s) x 2 "
                                                                                         "seed(s)" in r["markdown"])
    variant = r["results"]["temporal@mean"][0]["run"]
    assert ("temporal@mean/fold1/seed0" in variant
            and json.loads((Path(variant) / "config.json").read_text())["hp"]["pool"] == "mean")
    assert (tmp_path / "folds" / "folds.csv").read_text().splitlines()[0].endswith(",test clips / fold,excluded / fold")


def test_cli_folds_and_train_head_on_clips(video_store, tmp_path):
    from .test_cli import invoke

    store, root = video_store
    r = invoke("folds", store, "-m", root / "clips.csv", "--seeds", "0", "--hp", "classifier=linear", "--hp",
               "width=32",
               "--hp", "heads=4", "--hp", "mlp=64", "--recipe", "epochs=1", "-o", tmp_path / "folds")
    assert r.exit_code == 0 and "| temporal |" in r.output and "Test units: clips" in r.output, r.output
    r = invoke("train-head", store, "--head", "temporal", "--hp", "pool=mean", "--recipe", "epochs=1", "-o", tmp_path)
    assert r.exit_code == 0, r.output
    cfg = json.loads(next(tmp_path.glob("clips-temporal/seed0/config.json")).read_text())
    assert cfg["hp"] == {"pool": "mean", "classifier": "prompts", "standardize": False}


def test_handwritten_prompts_are_fixed_clip_text_features(video_store, tmp_path):
    """The paper's ablation: 'a photo of a <class> face.' through the store's text tower, never trained."""
    from fercache.heads.zeroshot import text_classifier
    from fercache.rundir import load_run
    from fercache.store import open_store
    from fercache.train import fit

    store, _ = video_store
    r = fit(store, "temporal", out_dir=tmp_path, recipe={"epochs": 2},
            hp={"classifier": "handwritten", "width": 32, "heads": 4, "mlp": 64})
    model, cfg, _ = load_run(r.run_dir)
    expected = text_classifier(open_store(store).meta, cfg.classes, templates=("a photo of a {} face.",))
    torch.testing.assert_close(model.text, expected)
    assert model.prompt is None and not any(k.startswith("prompt") for k in model.state_dict())


def test_clip_level_zero_shot_trains_nothing(video_store, tmp_path):
    """Mean-pooled frames against fixed hand-written prompts: the clip-level zero-shot row. No epoch runs, and the
    logits are CLIP's cosine of the averaged (middle-of-segment) frames with the prompts' text features."""
    import torch.nn.functional as F

    from fercache.data import clip_level, load_features
    from fercache.rundir import load_run
    from fercache.train import fit

    store, _ = video_store
    r = fit(store, "temporal", out_dir=tmp_path, hp={"classifier": "handwritten", "pool": "mean", "segments": 4})
    m = json.loads((r.run_dir / "metrics.json").read_text())
    assert m["history"] == [] and "nothing trained" in m["selection"]["solver"]["method"]
    model, cfg, _ = load_run(r.run_dir)
    clips = clip_level(load_features(store).rows("test"), cfg.recipe["max_frames"])
    x, lengths = torch.as_tensor(clips.x), torch.as_tensor(clips.lengths)
    idx = segment_indices(lengths, 4, train=False)
    mean = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1])).float().mean(1)
    model.eval()
    torch.testing.assert_close(model(x, None, lengths), 100 * F.normalize(mean, dim=-1) @ F.normalize(model.text,
                                                                                                    dim=-1).T)


def test_folds_refuses_the_au_head(video_store, tmp_path):
    from fercache.protocols import manifest_folds

    store, root = video_store
    with pytest.raises(ConfigError, match="use `fercache au-cv`"):
        manifest_folds(store, [str(root / "clips.csv")], ["temporal", "au@x"], tmp_path)
