"""The tiny Qwen2.5-VL checkpoint loads through the same Auto classes as the real 3B directory."""
from __future__ import annotations

import json
import threading
import time

import pytest

from reasonknee3d.config import from_mapping
from reasonknee3d.constants import IMAGE_PAD, IM_END, QWEN_SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START
from reasonknee3d.models.tiny_qwen import (CACHE_ENV, TINY_BUILD_MARKER, TinyQwenSizes, build_tiny_qwen2_5_vl,
                                           default_tiny_qwen_dir, mrope_section, tiny_qwen_build_info,
                                           user_cache_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return default_tiny_qwen_dir(tmp_path_factory.getbasetemp())


def test_loads_like_a_real_checkpoint(tiny_dir):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    proc = AutoProcessor.from_pretrained(tiny_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir)
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    assert type(proc.video_processor).__name__ == "Qwen2VLVideoProcessor"
    for t in QWEN_SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert cfg.video_token_id == tok.convert_tokens_to_ids(VIDEO_PAD)
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids(VISION_START)
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids(VISION_END)
    assert tok.eos_token == IM_END
    # Spare embedding rows beyond the tokenizer, as in the real checkpoint.
    assert cfg.text_config.vocab_size > len(tok)
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    # The chat template is a real Jinja template saved with the tokenizer.
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert f"{VISION_START}{VIDEO_PAD}{VISION_END}hi<|im_end|>" in text
    assert "You are a helpful assistant." in text


def test_tiny_model_runs_a_video_through_the_processor(tiny_dir):
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()
    video = torch.randint(0, 255, (4, 3, 56, 56), dtype=torch.uint8)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "x"}]}],
                                    add_generation_prompt=True)
    batch = proc(text=[text], videos=[video], return_tensors="pt",
                 videos_kwargs=dict(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56},
                                    cap_pixels_per_frame=False, do_sample_frames=False))
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()


def test_extra_corpus_is_learned(tmp_path):
    from transformers import AutoTokenizer

    word = "zyxwzyxwzyxw"
    path = build_tiny_qwen2_5_vl(tmp_path / "t", corpus=[word] * 200, bpe_vocab_size=1100)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok(word, add_special_tokens=False).input_ids) <= 2


def test_default_dir_is_built_once(tmp_path):
    first = default_tiny_qwen_dir(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = default_tiny_qwen_dir(tmp_path)
    assert again == first and first.parent == tmp_path / "checkpoints"
    assert first.name.startswith("tiny-qwen2.5-vl-")
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    info = json.loads((first / TINY_BUILD_MARKER).read_text())
    assert info == json.loads(json.dumps(tiny_qwen_build_info(TinyQwenSizes())))
    assert not [p for p in tmp_path.joinpath("checkpoints").iterdir() if p.name.startswith(".")]


def test_default_dir_is_in_the_user_cache_never_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "explicit"
    assert default_tiny_qwen_dir(build=False).parent == tmp_path / "explicit" / "checkpoints"
    monkeypatch.delenv(CACHE_ENV)
    assert user_cache_dir() == tmp_path / "xdg" / "reasonknee3d"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "reasonknee3d"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "explicit"))
    default_tiny_qwen_dir(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    assert [p.name for p in (tmp_path / "explicit").iterdir()] == ["checkpoints"]
    assert list((tmp_path / "cwd").iterdir()) == []


def test_folder_name_follows_everything_the_build_depends_on(tmp_path, monkeypatch):
    default = default_tiny_qwen_dir(tmp_path, build=False)
    # Sizes spelled out at their default values share the default folder; any other size gets its own.
    assert default_tiny_qwen_dir(tmp_path, build=False, hidden_size=64, seed=0) == default
    assert default_tiny_qwen_dir(tmp_path, build=False, hidden_size=128) != default
    assert default_tiny_qwen_dir(tmp_path, build=False, seed=1) != default
    # Another transformers release (which may save differently) does not reuse this install's folder.
    import importlib.metadata as md
    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "99.0" if name == "transformers" else real(name))
    assert default_tiny_qwen_dir(tmp_path, build=False) != default


def _fake_ranks(monkeypatch, rank_of_thread):
    from reasonknee3d.models import tiny_qwen
    monkeypatch.setattr(tiny_qwen, "_process_rank", lambda: (rank_of_thread(), 2))


def _count_builds(monkeypatch, before_rename=None):
    from reasonknee3d.models import tiny_qwen
    calls = []
    real = tiny_qwen.build_tiny_qwen2_5_vl

    def counted(*args, **kwargs):
        calls.append(threading.current_thread().name)
        out = real(*args, **kwargs)
        if before_rename is not None:
            before_rename()
        return out
    monkeypatch.setattr(tiny_qwen, "build_tiny_qwen2_5_vl", counted)
    return calls


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, bpe_vocab_size=600)


def test_other_ranks_wait_for_rank_0_and_never_build(tmp_path, monkeypatch):
    # Under a process group transformers writes model files on rank 0 only: rank 1 must read rank 0's build.
    _fake_ranks(monkeypatch, lambda: 0 if threading.current_thread().name == "rank0" else 1)
    calls = _count_builds(monkeypatch)
    results = {}

    def rank0():
        time.sleep(0.5)  # rank 1 arrives first and finds nothing
        results["rank0"] = default_tiny_qwen_dir(tmp_path, **SMALL)
    t = threading.Thread(target=rank0, name="rank0")
    t.start()
    results["rank1"] = default_tiny_qwen_dir(tmp_path, wait_s=120, **SMALL)
    t.join()
    assert results["rank0"] == results["rank1"] and (results["rank1"] / "config.json").is_file()
    assert calls == ["rank0"]


def test_a_waiting_rank_gives_up_with_the_path_and_the_remedy(tmp_path, monkeypatch):
    _fake_ranks(monkeypatch, lambda: 1)
    with pytest.raises(TimeoutError, match=rf"rank 1 of 2: waited 0 s .*{CACHE_ENV}"):
        default_tiny_qwen_dir(tmp_path, wait_s=0.3, **SMALL)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_concurrent_builders_leave_one_complete_folder(tmp_path, monkeypatch):
    # Both processes build before either renames: the second rename finds the first folder and drops its own.
    both_built = threading.Barrier(2, timeout=120)
    calls = _count_builds(monkeypatch, before_rename=both_built.wait)
    results = []
    threads = [threading.Thread(target=lambda: results.append(default_tiny_qwen_dir(tmp_path, **SMALL)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2 and len(results) == 2 and results[0] == results[1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [results[0].name]
    assert (results[0] / TINY_BUILD_MARKER).is_file()


def test_a_save_that_writes_no_model_files_is_refused(tmp_path, monkeypatch):
    # What transformers does on a rank other than 0 of a process group: config and weights are skipped.
    from transformers import PreTrainedModel
    monkeypatch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)
    with pytest.raises(RuntimeError, match=r"wrote no \['config.json', 'model.safetensors'\]"):
        build_tiny_qwen2_5_vl(tmp_path / "t", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_save_load_round_trip_through_the_auto_classes(tmp_path):
    """The installed transformers reads back exactly what it wrote, through the classes users call."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    first = build_tiny_qwen2_5_vl(tmp_path / "a", **SMALL)
    second = build_tiny_qwen2_5_vl(tmp_path / "b", **SMALL)
    # Deterministic: concurrent builders publish identical folders, whichever rename wins.
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()

    config = AutoConfig.from_pretrained(first)
    assert type(config).__name__ == "Qwen2_5_VLConfig" and config.text_config.hidden_size == SMALL["hidden_size"]
    model, info = AutoModelForImageTextToText.from_pretrained(first, output_loading_info=True)
    model.eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # Every parameter comes from the files (none left at a fresh random init) and every stored tensor is used.
    assert {k: v for k, v in info.items() if v} == {}
    tok = AutoTokenizer.from_pretrained(first)
    proc = AutoProcessor.from_pretrained(first)
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    state = model.state_dict()
    model.save_pretrained(tmp_path / "again")
    proc.save_pretrained(tmp_path / "again")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").eval()
    ids = tok("Region: the medial subregion of the patella.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert AutoTokenizer.from_pretrained(tmp_path / "again")("x y").input_ids == tok("x y").input_ids


@pytest.mark.parametrize("head_dim", [8, 16, 32, 128])
def test_mrope_section_sums_to_half_head_dim(head_dim):
    sec = mrope_section(head_dim)
    assert sum(sec) == head_dim // 2 and min(sec) >= 1
    if head_dim == 128:
        assert sec == [16, 24, 24]  # the real Qwen2.5-VL value


def test_sizes_are_validated():
    with pytest.raises(ValueError, match="hidden_sise"):
        from_mapping(TinyQwenSizes, {"hidden_sise": 64}, "tiny")
    with pytest.raises(ValueError, match="not divisible"):
        TinyQwenSizes(hidden_size=66, num_attention_heads=4)
