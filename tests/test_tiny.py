"""The embedded model's dataset, tokenizer, pixel judge and training script."""
import json

import numpy as np
import pytest
import torch

from sdwork import hooks
from sdwork.tiny import dataset, judge, models, quality, tokenizer, train


def test_dataset_is_reproducible_and_held_out_is_disjoint():
    train_c, held = dataset.split_combinations()
    assert len(held) == dataset.N_HELD_OUT and not set(train_c) & set(held)
    assert len(train_c) + len(held) == len(dataset.all_combinations())
    a, ca = dataset.make_dataset(held[:3], 2, seed=5)
    b, cb = dataset.make_dataset(held[:3], 2, seed=5)
    c, _ = dataset.make_dataset(held[:3], 2, seed=6)
    assert a.dtype == np.uint8 and a.shape == (6, 64, 64, 3)
    assert np.array_equal(a, b) and ca == cb and not np.array_equal(a, c)
    # every attribute value still appears in training
    for name, values in dataset.ATTRIBUTES.items():
        assert {getattr(t, name) for t in train_c} == set(values)


def test_caption_round_trip_and_errors():
    for attrs in dataset.all_combinations():
        assert dataset.parse_caption(attrs.caption) == attrs
    with pytest.raises(ValueError, match="expected 'a <size>"):
        dataset.parse_caption("a red circle")
    with pytest.raises(ValueError, match="unknown colour"):
        dataset.parse_caption("a small pink circle on a gray background")
    variants = dataset.one_attribute_variants(dataset.all_combinations()[0])
    assert len(variants) == sum(len(v) - 1 for v in dataset.ATTRIBUTES.values())


def test_tokenizer_keeps_every_word_whole(tmp_path):
    tokenizer.build_tokenizer_files(dataset.vocabulary_words(), tmp_path)
    tok = tokenizer.load_tokenizer(tmp_path)
    for w in dataset.vocabulary_words():
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))  # BOS word EOS
        assert tok.decode(ids[1:2]).strip() == w
    # unknown words still tokenize, byte by byte, never to an unknown token
    toks = tok.convert_ids_to_tokens(tok("zebra!").input_ids)
    assert "".join(toks[1:-1]).replace("</w>", "") == "zebra!"


@pytest.mark.slow
def test_pixel_judge_reads_every_dataset_image_right():
    images, captions = dataset.make_dataset(dataset.all_combinations(), 3, seed=11)
    acc = judge.accuracy(images, [dataset.parse_caption(c) for c in captions])
    assert acc["all"] == 1.0, acc


def test_pixel_judge_sees_wrong_images_as_wrong():
    rng = np.random.default_rng(0)
    red = dataset.render(dataset.Attrs("large", "red", "circle", "white"), rng)
    acc = judge.accuracy(red[None], [dataset.Attrs("small", "blue", "triangle", "black")])
    assert acc["colour"] == acc["shape"] == acc["size"] == acc["background"] == 0.0
    assert judge.judge(np.full((64, 64, 3), 128, np.uint8)) is None


def test_judge_templates_reproduce_the_renderers_shapes():
    # the fit's geometry is the dataset's: on a clean image the true shape fits almost exactly
    rng = np.random.default_rng(2)
    for shape in dataset.SHAPES:
        for size in dataset.SIZES:
            img = dataset.render(dataset.Attrs(size, "red", shape, "white"), rng).astype(float)
            bg, fg = np.array(dataset.BACKGROUNDS["white"], float), np.array(dataset.COLOURS["red"], float)
            alpha = judge.coverage(img, bg, fg)
            errors = judge.fit_errors(alpha, alpha > 0.5)
            others = [e for s, e in errors.items() if s != shape]
            assert errors[shape] < 0.1 * min(others), (shape, size, errors)


@pytest.mark.slow
def test_pixel_judge_is_even_handed_on_damaged_decoder_output():
    """VAE round trips with noise in the latents, of images whose shape is known: blurred, rounded
    and dented the way generated images are. The judge must read every shape about as well; the
    earlier fill-ratio rule read only 18-25% of these squares as squares."""
    from sdwork.load import load_pipeline

    torch.set_num_threads(1)
    vae = load_pipeline("tiny", progress=False).vae.eval()
    sets, targets = quality.labelled_round_trips(vae, per_combo=2, seed=3, noise=(0.5,))
    conf = quality.shape_confusion(sets["vae+0.5"], targets)
    per_shape = conf.diagonal() / conf.sum(1)
    assert per_shape.min() >= 0.7, dict(zip(dataset.SHAPES, per_shape))


SMALL = dict(train.DEFAULTS, per_combo=1, vae_steps=4, vae_batch=4, decoder_steps=2, decoder_batch=4,
             unet_steps=4, unet_batch=4,
             clip_steps=4, clip_batch=8, ckpt_every=2)


def _prerequisites(stage, cfg, work):
    """The unet stage trains on the VAE's latents."""
    work.mkdir()
    if stage == "unet":
        train.train_vae(dict(cfg), work, progress=False)


def _flat(state: dict) -> dict:
    """One level of tensors: the unet stage saves {"unet": state_dict, "text": state_dict}."""
    if not isinstance(next(iter(state.values())), dict):
        return state
    return {f"{k}.{j}": w for k, v in state.items() for j, w in v.items()}


def _crash_after_checkpoint(stage: str, at_step: int):
    """While active, training of `stage` stops (as on Ctrl-C) right after its checkpoint at `at_step`."""
    def crash(**point):
        if point == dict(stage=stage, step=at_step):
            raise KeyboardInterrupt
    return hooks.on("checkpoint_saved", crash)


def _cli(work, out, cfg, stages="vae,vae_decoder,unet,clip,save"):
    return (["--stages", stages, "--work", str(work), "--out", str(out), "--no-progress", "--threads", "1"]
            + [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()])


@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_training_resumes_bit_identically(tmp_path, stage):
    torch.set_num_threads(1)
    cfg = dict(SMALL, clip_unnamed_bg_per_shape=2, clip_unnamed_bg_weight=1.0)
    fn = train.STAGES[stage]
    _prerequisites(stage, cfg, tmp_path / "a")
    fn(dict(cfg), tmp_path / "a", progress=False)
    ref = torch.load(tmp_path / "a" / f"{stage}_final.pt", weights_only=True)

    _prerequisites(stage, cfg, tmp_path / "b")
    with _crash_after_checkpoint(stage, 2), pytest.raises(KeyboardInterrupt):
        fn(dict(cfg), tmp_path / "b", progress=False)
    assert torch.load(tmp_path / "b" / f"{stage}.ckpt", weights_only=True)["step"] == 2
    assert not (tmp_path / "b" / f"{stage}_final.pt").exists()
    fn(dict(cfg), tmp_path / "b", progress=False)
    got = torch.load(tmp_path / "b" / f"{stage}_final.pt", weights_only=True)
    ref, got = _flat(ref), _flat(got)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_changed_setting_is_refused_for_a_partial_or_finished_stage(tmp_path):
    torch.set_num_threads(1)
    work = tmp_path / "work"
    work.mkdir()
    with _crash_after_checkpoint("vae", 2), pytest.raises(KeyboardInterrupt):
        train.train_vae(dict(SMALL), work, progress=False)
    partial = (work / "vae.ckpt").read_bytes()
    with pytest.raises(train.StageMismatchError, match="vae: vae_lr was 0.001, now 0.002") as e:
        train.train_vae(dict(SMALL, vae_lr=2e-3), work, progress=False)
    assert "new --work folder" in str(e.value) and "vae.ckpt" in str(e.value)
    assert (work / "vae.ckpt").read_bytes() == partial  # refused before any work

    train.train_vae(dict(SMALL), work, progress=False)  # the same settings resume
    with pytest.raises(train.StageMismatchError) as e:
        train.train_vae(dict(SMALL, per_combo=2), work, progress=False)
    assert e.value.stages == {"train_images": ["per_combo was 1, now 2"], "vae": ["train_images.per_combo was 1, now 2"]}

    (work / "vae.settings.json").unlink()  # as left by a version that kept no stamps
    with pytest.raises(train.StageMismatchError, match="vae: no settings recorded"):
        train.train_vae(dict(SMALL), work, progress=False)


def test_a_retrained_upstream_stage_is_refused_downstream(tmp_path):
    torch.set_num_threads(1)
    work, new = tmp_path / "work", dict(SMALL, vae_lr=2e-3)
    work.mkdir()
    train.train_vae(dict(SMALL), work, progress=False)
    train.train_vae_decoder(dict(SMALL), work, progress=False)
    for name in ("vae.ckpt", "vae_final.pt"):
        (work / name).unlink()
    train.train_vae(dict(new), work, progress=False)  # its files gone, vae alone retrains
    with pytest.raises(train.StageMismatchError) as e:
        train.train_vae_decoder(dict(new), work, progress=False)
    assert e.value.stages == {s: ["vae.vae_lr was 0.001, now 0.002"] for s in ("latents", "vae_decoder")}
    assert "latents.pt" in str(e.value) and "vae_decoder_final.pt" in str(e.value)
    # the command line refuses before its first stage: clip would be fine but does not start
    with pytest.raises(train.StageMismatchError, match="latents: vae.vae_lr"):
        train.main(_cli(work, tmp_path / "out", new, stages="clip,unet"))
    assert not list(work.glob("clip*")) and not list(work.glob("unet*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(work folder, out folder) of one run of the command line, every stage, with SMALL."""
    tmp = tmp_path_factory.mktemp("trained")
    train.main(_cli(tmp / "work", tmp / "models", SMALL))
    return tmp / "work", tmp / "models"


def test_training_writes_a_loadable_pipeline_and_scorer(trained):
    from sdwork.load import load_pipeline

    _, out = trained
    pipe = load_pipeline(out / "tiny-sd", progress=False)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.scaling_factor != 1.0
    assert (out / "tiny-sd" / "tokenizer" / "vocab.json").exists()
    assert (out / "tiny-clip" / "model.safetensors").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only


def test_training_config_is_the_recipe_of_the_stage_stamps(trained):
    work, out = trained
    got = json.loads((out / "training_config.json").read_text())
    assert list(got) == ["train_images", "vae", "latents", "vae_decoder", "unet", "clip"]
    for stage in ("vae", "vae_decoder", "unet", "clip"):
        stamp = json.loads((work / f"{stage}.settings.json").read_text())
        assert {s: got[s] for s in stamp} == stamp
    assert got["vae"] == dict(seed=0, vae_steps=4, vae_batch=4, vae_lr=1e-3)
    assert "ckpt_every" not in json.dumps(got)  # checkpointing does not change the weights


def test_save_refuses_settings_the_weights_were_not_trained_with(trained):
    """`--stages save` with another value on the command line: the weights on disk were not
    trained with it, so save refuses rather than record a recipe that did not happen."""
    work, out = trained
    before = (out / "training_config.json").read_text()
    with pytest.raises(train.StageMismatchError) as e:
        train.main(_cli(work, out, dict(SMALL, clip_lr=0.5), stages="save"))
    assert e.value.stages == {"clip": ["clip_lr was 0.001, now 0.5"]}
    with pytest.raises(train.StageMismatchError) as e:
        train.main(_cli(work, out, dict(SMALL, vae_lr=0.5), stages="save"))
    assert set(e.value.stages) == {"vae", "latents", "vae_decoder", "unet"}
    assert (out / "training_config.json").read_text() == before


def test_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--stages", "vae,teleport", "--work", str(tmp_path)])


def test_partial_caption_names_only_kept_attributes():
    a = dataset.Attrs("small", "green", "circle", "black")
    assert dataset.partial_caption(a, np.array([True] * 4)) == a.caption
    assert dataset.partial_caption(a, np.array([False, True, False, False])) == "a green shape"
    assert dataset.partial_caption(a, np.array([True, False, True, True])) == "a small circle on a black background"


def test_unnamed_background_set_names_no_background_and_no_held_out_combination():
    train_combos, held = dataset.split_combinations()
    images, captions = dataset.make_unnamed_background_set(train_combos, 2, seed=3)
    again, _ = dataset.make_unnamed_background_set(train_combos, 2, seed=3)
    assert np.array_equal(images, again)
    triplets = {(a.size, a.colour, a.shape) for a in train_combos}
    assert {tuple(c.split()[1:]) for c in captions} == triplets and all(len(c.split()) == 4 for c in captions)
    named = np.array(list(dataset.BACKGROUNDS.values()))
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(int)  # shapes keep 2 px off the border
    assert (np.abs(corners[:, :, None, :] - named[None, None]).max(-1) > 40).all()


def test_weight_zero_switches_the_unnamed_set_off(tmp_path):
    """At weight 0 the set is neither built nor drawn from: its size changes nothing."""
    torch.set_num_threads(1)
    out = {}
    for n in (2, 5):
        (tmp_path / str(n)).mkdir()
        train.train_clip(dict(SMALL, clip_unnamed_bg_weight=0.0, clip_unnamed_bg_per_shape=n), tmp_path / str(n), progress=False)
        out[n] = torch.load(tmp_path / str(n) / "clip_final.pt", weights_only=True)
    assert all(torch.equal(out[2][k], out[5][k]) for k in out[2])


def test_trimmed_caption_ids_give_the_same_text_features(tmp_path):
    """Training drops the padding after the end token; the causal text tower must not notice."""
    torch.set_num_threads(1)
    tokenizer.build_tokenizer_files(dataset.vocabulary_words(), tmp_path)
    tok = tokenizer.load_tokenizer(tmp_path)
    torch.manual_seed(0)
    clip = models.build_clip(*train.special_ids(tok)).eval()
    captions = [c.caption for c in dataset.all_combinations()[:20]] + ["a circle"]
    ids = train.token_ids(tok, captions)
    short = train._trim(ids, tok.eos_token_id)
    assert short.shape[1] == 10  # BOS, 8 words, EOS
    with torch.no_grad():
        full, trimmed = (train.features(clip.get_text_features(input_ids=x)) for x in (ids, short))
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)  # float summation order only
    no_end = ids.clone()
    no_end[0, :] = tok.bos_token_id  # no end token: nothing may be cut
    assert torch.equal(train._trim(no_end, tok.eos_token_id), no_end)


def test_text_shape_loss_maps_each_caption_to_its_own_background_free_caption(tmp_path):
    tokenizer.build_tokenizer_files(dataset.vocabulary_words(), tmp_path)
    tok = tokenizer.load_tokenizer(tmp_path)
    captions = [c.caption for c in dataset.split_combinations()[0]]
    data = train._text_shape_data(captions, tok)
    texts = tok.batch_decode(data["ids"], skip_special_tokens=True)
    assert len(texts) == 36  # 2 sizes x 6 colours x 3 shapes, all present in training
    for c, t in zip(captions, data["targets"]):
        a = dataset.parse_caption(c)
        assert texts[int(t)].split() == ["a", a.size, a.colour, a.shape]
    torch.manual_seed(0)
    clip = models.build_clip(*train.special_ids(tok))
    cand_ids = train._trim(train.token_ids(tok, captions), tok.eos_token_id)
    train._text_shape_loss(clip, cand_ids, data).backward()
    assert clip.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.vision_model.parameters())  # text only
