"""The diffusion family on a tiny SD-shaped pipeline (built from config, saved as a diffusers
folder) with a tiny ViT as the DINO scorer: data, caches, losses, every strategy, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from continual_lora.config import ConfigError, load_run_config
from continual_lora.diffusion_parts import PipelineSizes, build_components, save_pipeline
from continual_lora.families import make_family
from continual_lora.runner import run
from continual_lora.sequence import load_sequence

TINY = PipelineSizes(image_size=16, vae_channels=(8, 16), latent_channels=4,
                     unet_channels=(16, 32), attention_head_dim=8, text_width=16, text_layers=1,
                     text_heads=2, max_length=8, norm_groups=8)
WORDS = ["a", "photo", "of", "sks", "red", "blue", "square", "circle", "toy"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    return save_pipeline(build_components(TINY, WORDS, seed=0), folder)


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A tiny ViT saved with its image processor: the DINO scorer's code path, real classes."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-dino")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32),
             add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def _draw(path, shape: str, colour: str, i: int, size: int = 24) -> None:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (2 + i % 4, 3 + i % 3, 16 + i % 5, 18 + i % 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colour)
    image.save(path)


def _concept(folder, shape, colour, n, caption=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _draw(folder / f"{shape}{i:02d}.png", shape, colour, i)
        if caption:
            (folder / f"{shape}{i:02d}.txt").write_text(f"a photo of sks {colour} {shape}\n")
    return folder


@pytest.fixture(scope="module")
def concept_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    return (_concept(root / "squares", "square", "red", 4),
            _concept(root / "circles", "circle", "blue", 4))


def _config(tmp_path, pipeline, dino, concept_dirs, strategy="naive", options=None, **extra):
    data = {
        "name": f"tiny-{strategy}", "seed": 0,
        "model": {"family": "diffusion", "name_or_path": str(pipeline), "dino": str(dino),
                  "inference_steps": 2, "samples_per_prompt": 2, "guidance_scale": 2.0},
        "lora": {"r": 2},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 2, "eval_batch_size": 8,
                  "warmup_ratio": 0.0, "checkpoint_every": 100},
        "tasks": [{"name": "squares", "images": str(concept_dirs[0])},
                  {"name": "circles", "images": str(concept_dirs[1])}],
        "upstream": {"prompts": ["a photo of a toy"]},
        "strategy": {"name": strategy, "options": options or {}},
        "output_dir": str(tmp_path / "runs"),
    }
    data.update(extra)
    return load_run_config(None, data=data)


def test_encoders_run_once_per_image_and_caption(tmp_path, tiny_pipeline, tiny_dino,
                                                 concept_dirs):
    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs)
    tasks, _ = load_sequence(cfg)
    family = make_family(cfg.model, cfg.seed)
    family.load()
    for task in tasks:
        family.begin_task(task, tasks, [task.index], [])
    assert family.encoder_calls["vae"] == 8  # 4 + 4 images
    assert family.encoder_calls["text"] == 2  # one caption per concept
    by_index = {t.index: t for t in tasks}
    for _ in range(5):  # training batches reuse the caches
        batch = family.collate([(1, 0), (1, 3), (2, 1), (2, 2)], by_index)
        out = family.forward(batch)
        assert torch.isfinite(out.loss) and out.per_example_loss.shape == (4,)
    assert family.encoder_calls == {"vae": 8, "text": 2}
    # the cached latent is the VAE posterior mean times the scaling factor
    record = tasks[0].train.records[0]["image"]
    pixels = family._pixels(record).unsqueeze(0)
    with torch.no_grad():
        direct = family.vae.encode(pixels).latent_dist.mean[0] * family.vae.config.scaling_factor
    torch.testing.assert_close(family.latent(record.key), direct)


def test_loss_is_the_weighted_epsilon_mse(tmp_path, tiny_pipeline, tiny_dino, concept_dirs):
    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs)
    tasks, _ = load_sequence(cfg)
    family = make_family(cfg.model, cfg.seed)
    family.load()
    family.begin_task(tasks[0], tasks, [1], [])
    torch.manual_seed(3)
    batch = family.collate([(1, 0), (1, 1)], {1: tasks[0]})
    batch["weights"] = torch.tensor([1.0, 0.5])
    out = family.forward(batch)
    with torch.no_grad():
        pred = family.backbone(batch["noisy"], batch["timesteps"],
                               encoder_hidden_states=batch["cond"]).sample
    per = ((pred - batch["target"]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_example_loss, per)
    torch.testing.assert_close(out.loss, (per * torch.tensor([1.0, 0.5])).mean())


def test_kohya_dataset_config_repeats_mix(tmp_path, tiny_pipeline, tiny_dino):
    """Seed 000's "old 20 images + new 10 images with repeats 2" as one kohya TOML."""
    old = _concept(tmp_path / "old", "square", "red", 20)
    new = _concept(tmp_path / "new", "circle", "blue", 10)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""[general]
resolution = 16
caption_extension = ".txt"

[[datasets]]
batch_size = 4

  [[datasets.subsets]]
  image_dir = "{old}"
  num_repeats = 1

  [[datasets.subsets]]
  image_dir = "{new}"
  num_repeats = 2
""")
    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, (old, new),
                  tasks=[{"name": "both", "dataset_config": str(toml)}])
    tasks, _ = load_sequence(cfg)
    captions = tasks[0].train.texts
    assert len(captions) == 40
    assert captions.count("a photo of sks red square") == 20
    assert captions.count("a photo of sks blue circle") == 20
    assert tasks[0].manifest["images"] == 30
    assert any("resolution" in line for line in tasks[0].manifest["kohya_keys_ignored"])
    family = make_family(cfg.model, cfg.seed)
    family.load()
    family.begin_task(tasks[0], tasks, [1], [])
    assert family.encoder_calls["vae"] == 30  # each image once, whatever its repeats


def test_kohya_train_dir_folder_names(tmp_path, tiny_pipeline, tiny_dino):
    root = tmp_path / "train_data_dir"
    _concept(root / "3_sks red square", "square", "red", 2, caption=False)
    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, (root, root),
                  tasks=[{"name": "k", "images": str(root)}])
    tasks, _ = load_sequence(cfg)
    assert tasks[0].train.texts == ["sks red square"] * 6


@pytest.mark.parametrize("strategy, options", [
    ("naive", {}), ("replay", {}), ("merge_reinit", {}), ("ortho_init", {}), ("magmax", {}),
    ("merge", {"method": "ties"}), ("lwf", {"alpha": 1.0}), ("olora", {}), ("joint", {}),
    ("full_ft", {}),
])
def test_every_strategy_runs_and_writes_the_run_folder(tmp_path, tiny_pipeline, tiny_dino,
                                                       concept_dirs, strategy, options):
    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs, strategy, options)
    result = run(cfg, echo=lambda _: None)
    folder = result.run_dir
    assert result.R.shape == (3, 2) and np.isfinite(result.R).all()
    assert np.isfinite(result.U).all()
    assert -1.0 <= result.R.min() and result.R.max() <= 1.0
    results = json.loads((folder / "results.json").read_text())
    assert set(results["details"][1][0]) == {"dino", "recognised"}
    for stage in (0, 1, 2):
        grid = Image.open(folder / "samples" / f"stage-{stage:02d}.png")
        assert grid.size[0] > 150 and grid.size[1] >= 3 * 96  # two tasks and the probe
    last = folder / "tasks" / "02-circles"
    if strategy == "full_ft":
        assert (last / "model" / "config.json").is_file()
    else:
        assert (last / "adapter" / "adapter_model.safetensors").is_file()
        assert (last / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["acc"] == pytest.approx(result.R[-1].mean())


def _image(pipe):
    """The test prompt's image at seed 0, 2 steps, 16 pixels."""
    return pipe("a photo of sks blue circle", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), height=16, width=16).images


def _assert_loads_like_peft(load_pipeline, adapter, denoiser: str) -> None:
    """`pipeline.load_lora_weights(adapter)` changes the image, and the PEFT copy merged into
    the pipeline's `denoiser` by PEFT gives the same image (alpha/rank kept)."""
    from peft import PeftModel

    pipe = load_pipeline()
    before = _image(pipe)
    pipe.load_lora_weights(str(adapter))
    after = _image(pipe)
    assert np.abs(after - before).max() > 1e-3
    plain = load_pipeline()
    merged = PeftModel.from_pretrained(getattr(plain, denoiser), str(adapter)).merge_and_unload()
    setattr(plain, denoiser, merged)
    np.testing.assert_allclose(_image(plain), after, atol=1e-4)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_run_adapter_loads_in_a_diffusers_pipeline(tmp_path, tiny_pipeline, tiny_dino,
                                                   concept_dirs):
    """The stage adapter we write loads with `pipeline.load_lora_weights` and changes the
    image; the PEFT copy loaded on the UNet gives the same image."""
    from diffusers import StableDiffusionPipeline

    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs,
                  train={"lr": 5e-2, "batch_size": 4, "max_steps": 3, "warmup_ratio": 0.0})
    result = run(cfg, echo=lambda _: None)
    adapter = result.run_dir / "tasks" / "02-circles" / "adapter"
    _assert_loads_like_peft(
        lambda: _quiet(StableDiffusionPipeline.from_pretrained(str(tiny_pipeline))), adapter,
        "unet")


def test_eval_rescores_a_stage_exactly(tmp_path, tiny_pipeline, tiny_dino, concept_dirs):
    from continual_lora.evaluate import evaluate_run, rows_match

    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs)
    result = run(cfg, echo=lambda _: None)
    row, recorded, _ = evaluate_run(result.run_dir)
    assert rows_match(row, recorded, tol=1e-4)


def test_prior_preservation_adds_weighted_class_images(tmp_path, tiny_pipeline, tiny_dino,
                                                       concept_dirs):
    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs, tasks=[
        {"name": "squares", "images": str(concept_dirs[0]), "class_prompt": "a photo of a square",
         "prior_images": 3, "prior_weight": 0.5}])
    tasks, _ = load_sequence(cfg)
    family = make_family(cfg.model, cfg.seed)
    family.load()
    family.begin_task(tasks[0], tasks, [1], [])
    rows = tasks[0].train.records
    assert len(rows) == 7 and len(tasks[0].train) == 7
    assert [r["weight"] for r in rows[4:]] == [0.5] * 3
    assert all(r["image"].is_reg for r in rows[4:])
    assert family.encoder_calls["vae"] == 4  # prior latents come from the sampler itself


def test_lwf_teacher_cache_matches_the_model_before_the_task(tmp_path, tiny_pipeline,
                                                             tiny_dino, concept_dirs):
    from continual_lora.strategies.lwf import teacher_predictions

    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs)
    tasks, _ = load_sequence(cfg)
    family = make_family(cfg.model, cfg.seed)
    family.load()
    cache = teacher_predictions(family, tasks[0], draws=3, seed=1, batch_size=2)
    assert cache.noisy.shape == (4, 3, 4, 8, 8) and cache.timesteps.shape == (4, 3)
    # before any update the student is the teacher: the preservation term is zero
    loss = cache.loss(family, family.module, torch.tensor([0, 2, 3]))
    assert float(loss) < 1e-10


@pytest.mark.parametrize("change, message", [
    ({"tasks": [{"name": "a", "concept": "zebra"}]}, "concept: built-in concepts"),
    ({"model": {"family": "diffusion", "name_or_path": "PIPE"}},
     "samples are scored by image similarity"),
    ({"tasks": [{"name": "a", "wordnet": ["noun.animal", "noun.plant"]}]},
     "not a data source of a diffusion model"),
    ({"upstream": {"kind": "concepts"}}, "needs the embedded diffusion model"),
])
def test_config_errors_name_the_field(tmp_path, tiny_pipeline, tiny_dino, concept_dirs, change,
                                      message):
    base = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs).model_dump(
        mode="json", exclude={"base_dir"})
    change = yaml.safe_load(yaml.safe_dump(change).replace("PIPE", str(tiny_pipeline)))
    base.update(change)
    with pytest.raises(ConfigError, match=message):
        tasks_cfg = load_run_config(None, data=base)
        load_sequence(tasks_cfg)


def test_moe_is_refused_with_a_message(tmp_path, tiny_pipeline, tiny_dino, concept_dirs):
    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs, "moe")
    with pytest.raises(ConfigError, match="moe .* does not run on a diffusion model"):
        run(cfg, echo=lambda _: None)
    assert not (tmp_path / "runs" / "tiny-moe").exists()


def test_tokenizer_keeps_every_vocabulary_word_whole():
    """Merges learned BPE-style: a word never splits on another word's merge (per-word merge
    chains split "silhouette" on the `h o` of "horse" and pushed class words past max_length)."""
    from continual_lora.diffusion_parts import clip_tokenizer

    words = ["silhouette", "horse", "handwritten", "eight", "giraffe", "of", "a", "sheep"]
    tokenizer = clip_tokenizer(words, 12)
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a silhouette of a giraffe").input_ids
    assert len(ids) == 7 and tokenizer.decode(ids[1:-1]) == "a silhouette of a giraffe"
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) > 1  # still tokenizes


def test_bench_writes_seed_003_table(tmp_path, tiny_pipeline, tiny_dino, concept_dirs):
    from continual_lora.bench import run_bench
    from continual_lora.config import load_bench_config
    from continual_lora.metrics import average_accuracy, forgetting

    run_cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs).model_dump(
        mode="json", exclude={"base_dir", "strategy", "name"})
    cfg = load_bench_config(None, data={"name": "pers", "include_joint": False, "run": run_cfg,
                                        "strategies": [{"name": "naive"},
                                                       {"name": "merge_reinit"}]})
    bench_dir, results = run_bench(cfg, echo=lambda _: None)
    table = (bench_dir / "personalization.md").read_text().splitlines()
    assert table[0] == ("| method | Average Score dino | Average Score recognised | "
                        "Average Forgetting dino | Average Forgetting recognised |")
    assert table[2].startswith(f"| base model (reference) | {results[0].R[0].mean():.3f} |")
    naive = results[0].R
    details = json.loads((bench_dir / "runs" / "naive-r2" / "results.json").read_text())
    recognised = np.array([[cell["recognised"] for cell in row] for row in details["details"]])
    assert ((recognised >= 0) & (recognised <= 1)).all()
    assert table[3] == (f"| naive | {average_accuracy(naive):.3f} | "
                        f"{average_accuracy(recognised):.3f} | {forgetting(naive):.3f} | "
                        f"{forgetting(recognised):.3f} |")

    # The report page: the personalization table, and every stage's sample grid, embedded.
    from continual_lora.report.page import build_report

    page = build_report(bench_dir).read_text()
    assert "Personalization scores" in page and "base model (reference)" in page
    # (stage 0 is sampled once, by the first row: the bench shares its starting point)
    for run_name, stages in (("naive-r2", (0, 1, 2)), ("merge_reinit-r2", (1, 2))):
        for stage in stages:
            assert f'data-file="runs/{run_name}/samples/stage-{stage:02d}.png"' in page


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL-shaped pipeline: two text encoders (the second with a projection, whose
    pooled output and the time ids are the UNet's added conditions)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    parts = build_components(TINY, WORDS, seed=0)
    tokenizer = parts["tokenizer"]
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY.text_width, projection_dim=8,
        intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=TINY.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=TINY.unet_channels,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        cross_attention_dim=2 * TINY.text_width, attention_head_dim=8,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8)
    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=parts["scheduler"])
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_sdxl_pipeline_trains_and_its_adapter_loads_in_diffusers(tmp_path, tiny_sdxl,
                                                                 tiny_dino, concept_dirs):
    """SDXL's path: both encoders' penultimate states, the pooled embedding and the time ids
    reach the UNet in training and sampling, and the adapter loads into the SDXL pipeline."""
    from diffusers import StableDiffusionXLPipeline

    family = make_family(_config(tmp_path, tiny_sdxl, tiny_dino, concept_dirs).model)
    family.load()
    assert family.sdxl
    family.cache_text(["a photo of sks red square"])
    hidden, pooled = family._text["a photo of sks red square"]
    assert hidden.shape == (TINY.max_length, 2 * TINY.text_width) and pooled.shape == (8,)

    cfg = _config(tmp_path, tiny_sdxl, tiny_dino, concept_dirs,
                  train={"lr": 5e-2, "batch_size": 4, "max_steps": 3, "warmup_ratio": 0.0})
    result = run(cfg, echo=lambda _: None)
    assert result.R.shape == (3, 2) and np.isfinite(result.R).all()
    assert (result.run_dir / "samples" / "stage-02.png").is_file()
    _assert_loads_like_peft(
        lambda: _quiet(StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))),
        result.run_dir / "tasks" / "02-circles" / "adapter", "unet")


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3-shaped pipeline: an MMDiT transformer, two CLIP text encoders with
    projections, no T5 (the pipeline then conditions on zeros in its place), flow matching."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    parts = build_components(TINY, WORDS, seed=0)
    tokenizer = parts["tokenizer"]
    parts["vae"].register_to_config(shift_factor=0.0)

    def clip(seed):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TINY.text_width, projection_dim=8,
            intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
            max_position_embeddings=TINY.max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    torch.manual_seed(2)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * TINY.text_width,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=parts["vae"], text_encoder=clip(1), tokenizer=tokenizer, text_encoder_2=clip(3),
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    folder = tmp_path_factory.mktemp("tiny-sd3")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_sd3_flow_matching_noise_and_target(tmp_path, tiny_sd3, tiny_dino, concept_dirs):
    """Flow matching as diffusers' SD3 script: noisy = (1 − σ)·x0 + σ·ε with σ = t/1000 on
    the training schedule, target ε − x0; captions encoded as StableDiffusion3Pipeline does."""
    family = make_family(_config(tmp_path, tiny_sd3, tiny_dino, concept_dirs).model)
    family.load()
    assert family.kind == "sd3" and family.noise_scheduler.config.shift == 3.0
    x0, noise = torch.full((1, 4, 8, 8), 2.0), torch.full((1, 4, 8, 8), -1.0)
    t = torch.tensor([250.0])
    torch.testing.assert_close(family.add_noise(x0, noise, t), torch.full_like(x0, 1.25))
    torch.testing.assert_close(family.training_target(x0, noise, t), torch.full_like(x0, -3.0))
    torch.manual_seed(0)
    drawn = family.draw_timesteps(500)
    assert set(drawn.tolist()) <= set(family.noise_scheduler.timesteps.tolist())
    assert drawn.min() >= 1 and drawn.max() <= 1000  # shifted by 3: mass moves to high noise
    assert drawn.median() > 600

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3), text_encoder_3=None,
                                                    tokenizer_3=None)
    expected, _, pooled, _ = pipe.encode_prompt("a photo of sks red square", None, None,
                                                do_classifier_free_guidance=False)
    family.cache_text(["a photo of sks red square"])
    hidden, ours = family._text["a photo of sks red square"]
    torch.testing.assert_close(hidden, expected[0])
    torch.testing.assert_close(ours, pooled[0])
    # sampling (Euler flow matching, classifier-free guidance) gives the pipeline's image
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of sks red square", num_inference_steps=2, guidance_scale=2.0,
                  height=16, width=16, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    ours = family.sample(["a photo of sks red square"], [0], batch_size=1)
    np.testing.assert_allclose(ours / 255.0, theirs, atol=2 / 255)


def test_sd3_pipeline_trains_and_its_adapter_loads_in_diffusers(tmp_path, tiny_sd3, tiny_dino,
                                                                concept_dirs, tiny_pipeline):
    from diffusers import StableDiffusion3Pipeline

    cfg = _config(tmp_path, tiny_sd3, tiny_dino, concept_dirs, strategy="lwf",
                  train={"lr": 5e-2, "batch_size": 4, "max_steps": 3, "warmup_ratio": 0.0})
    result = run(cfg, echo=lambda _: None)
    assert result.R.shape == (3, 2) and np.isfinite(result.R).all()
    assert (result.run_dir / "samples" / "stage-02.png").is_file()
    adapter = result.run_dir / "tasks" / "02-circles" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {"to_q", "add_q_proj", "to_add_out"} <= set(config["target_modules"])
    _assert_loads_like_peft(
        lambda: _quiet(StableDiffusion3Pipeline.from_pretrained(
            str(tiny_sd3), text_encoder_3=None, tokenizer_3=None)), adapter, "transformer")

    # `convert` tells an SD3 adapter by its paths: transformer keys, and no kohya file
    from safetensors.torch import load_file

    from continual_lora.convert import convert

    written = convert(adapter, "diffusers", tmp_path / "sd3-diffusers", echo=lambda _: None)
    assert all(k.startswith("transformer.") for k in load_file(str(written)))
    with pytest.raises(Exception, match="transformer .SD3/FLUX. LoRA.*--to diffusers"):
        convert(adapter, "kohya", tmp_path / "sd3.safetensors", echo=lambda _: None)
    assert not (tmp_path / "sd3.safetensors").exists()
    said: list[str] = []  # checked against its base by name and shape, module by module
    convert(adapter, "peft", tmp_path / "sd3-peft", base=tiny_sd3, echo=said.append)
    assert any("matched" in line and "unmatched" not in line for line in said), said
    with pytest.raises(Exception, match="transformer"):  # an SD3 LoRA on an SD1-shaped base
        convert(adapter, "peft", tmp_path / "sd1-peft", base=tiny_pipeline, echo=lambda _: None)
    assert not (tmp_path / "sd1-peft").exists()


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    """A tiny FLUX-shaped pipeline: CLIP (pooled) + T5 (states) text encoders, a guidance-
    distilled MMDiT on 2×2-packed latents, a dynamically shifted flow-matching schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    parts = build_components(TINY, WORDS, seed=0)
    tokenizer = parts["tokenizer"]
    parts["vae"].register_to_config(shift_factor=0.0)
    torch.manual_seed(4)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32,
                                 num_layers=1, num_heads=2, pad_token_id=tokenizer.pad_token_id,
                                 decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=TINY.text_width,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=parts["vae"], text_encoder=parts["text_encoder"],
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
                        transformer=transformer)
    folder = tmp_path_factory.mktemp("tiny-flux")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _flux_config(tmp_path, tiny_flux, tiny_dino, concept_dirs, **extra):
    model = {"family": "diffusion", "name_or_path": str(tiny_flux), "dino": str(tiny_dino),
             "inference_steps": 2, "samples_per_prompt": 2, "guidance_scale": 3.5,
             "image_size": 16}
    return _config(tmp_path, tiny_flux, tiny_dino, concept_dirs, model=model, **extra)


def test_flux_samples_are_the_pipelines_own(tmp_path, tiny_flux, tiny_dino, concept_dirs):
    """Packing, caption encoding, the guidance input and the σ grid as FluxPipeline's: the same
    seed gives the pipeline's image."""
    from diffusers import FluxPipeline

    family = make_family(_flux_config(tmp_path, tiny_flux, tiny_dino, concept_dirs).model)
    family.load()
    assert family.kind == "flux" and family.flow
    ours = family.sample(["a photo of sks red square"], [0], batch_size=1)
    pipe = FluxPipeline.from_pretrained(str(tiny_flux))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of sks red square", num_inference_steps=2, guidance_scale=3.5,
                  height=16, width=16, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.testing.assert_allclose(ours / 255.0, theirs, atol=2 / 255)
    # a schedule without dynamic shifting (FLUX-schnell's): still the pipeline's σ grid
    from diffusers import FlowMatchEulerDiscreteScheduler

    family.sampler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ours = family.sample(["a photo of sks red square"], [0], batch_size=1)
    theirs = pipe("a photo of sks red square", num_inference_steps=2, guidance_scale=3.5,
                  height=16, width=16, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.testing.assert_allclose(ours / 255.0, theirs, atol=2 / 255)


def test_flux_pipeline_trains_and_its_adapter_loads_in_diffusers(tmp_path, tiny_flux, tiny_dino,
                                                                 concept_dirs):
    from diffusers import FluxPipeline

    cfg = _flux_config(tmp_path, tiny_flux, tiny_dino, concept_dirs,
                       train={"lr": 5e-2, "batch_size": 4, "max_steps": 3, "warmup_ratio": 0.0})
    result = run(cfg, echo=lambda _: None)
    assert result.R.shape == (3, 2) and np.isfinite(result.R).all()
    adapter = result.run_dir / "tasks" / "02-circles" / "adapter"
    _assert_loads_like_peft(lambda: _quiet(FluxPipeline.from_pretrained(str(tiny_flux))),
                            adapter, "transformer")


def test_lwf_with_prior_preservation_caches_the_class_images_too(tmp_path, tiny_pipeline,
                                                                 tiny_dino, concept_dirs):
    """lwf's teacher cache is built before the family adds a task's prior images: it must
    cover them (their example ids come after the task's own), not stop at the task's own."""
    tasks = [{"name": "squares", "images": str(concept_dirs[0])},
             {"name": "circles", "images": str(concept_dirs[1]),
              "class_prompt": "a photo of a circle", "prior_images": 3}]
    cfg = _config(tmp_path, tiny_pipeline, tiny_dino, concept_dirs, strategy="lwf",
                  tasks=tasks, train={"lr": 1e-3, "batch_size": 7, "max_steps": 2,
                                      "warmup_ratio": 0.0})
    result = run(cfg, echo=lambda _: None)  # every batch holds all 7 circles examples
    assert np.isfinite(result.R).all()
    stats = json.loads((result.run_dir / "results.json").read_text())["training"]
    assert [s["steps"] for s in stats] == [2, 2]
