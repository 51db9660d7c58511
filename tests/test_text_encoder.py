"""The text encoder as one component: its tokenizers (byte, word), its state in checkpoints,
and the one place it is built from a config."""

import json
import warnings

import pytest
import torch
from helpers import randomize, tiny_config
from hypothesis import given
from hypothesis import strategies as st

from diffusion import AdvancedDiffusionTrainer, all_captions
from diffusion.checkpoint import load_checkpoint_file
from diffusion.data import training_captions
from nets import AdvancedUNet, ByteTokenizer, TextEncoder, WordTokenizer, build_text_encoder
from nets.text_encoder import (
    BOS_ID,
    EOS_ID,
    EXTRA_STATE_KEY,
    VOCAB_SIZE,
    split_words,
    tokenizer_from_state,
)
from sampling import AdvancedDiffusionPipeline

DIGITS = [f"a handwritten digit {d}" for d in range(10)]


def test_word_tokenizer_gives_each_word_one_token():
    """"circle" and "cross" share a first byte but not a token; a caption is BOS, one id per
    word, EOS; the most frequent words get the first ids."""
    tokenizer = WordTokenizer.from_captions(all_captions())
    assert tokenizer.words[0] == "a"  # in all 24 captions
    assert len(tokenizer.words) == 1 + 6 + 4 and tokenizer.vocab_size == VOCAB_SIZE + 11
    ids = tokenizer.encode("a red circle")
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) == 5
    assert all(i >= VOCAB_SIZE for i in ids[1:-1])
    assert tokenizer.encode("a red cross")[3] != ids[3]
    assert tokenizer.decode(ids) == "a red circle"


def test_captions_that_differ_in_one_character_differ_in_one_token():
    tokenizer = WordTokenizer.from_captions(DIGITS)
    encoded = [tokenizer.encode(caption) for caption in DIGITS]
    assert len({tuple(ids) for ids in encoded}) == 10
    assert all(ids[:-2] == encoded[0][:-2] for ids in encoded)  # only the digit's token differs


@given(st.lists(st.text(alphabet="ab ,.é", max_size=12), min_size=1, max_size=6),
       st.text(alphabet="abc ,.é", max_size=12))
def test_word_tokens_decode_to_the_words(captions, prompt):
    """Any prompt, with seen or unseen words, decodes to its words joined by spaces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unseen words warn; tested below
        if not any(split_words(c) for c in captions):
            with pytest.raises(ValueError, match="hold no words"):
                WordTokenizer.from_captions(captions)
            return
        tokenizer = WordTokenizer.from_captions(captions)
        assert tokenizer.decode(tokenizer.encode(prompt)).split() == split_words(prompt)


def test_an_unseen_word_is_read_as_bytes_with_one_warning():
    tokenizer = WordTokenizer.from_captions(all_captions())
    with pytest.warns(UserWarning, match=r"word 'purple' of prompt 'a purple circle' is not in "
                                         r"the tokenizer's vocabulary \(11 words"):
        ids = tokenizer.encode("a purple circle")
    assert ids[2:-2] == list(b" purple")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time it is silent
        assert tokenizer.encode("a purple square")[2:-2] == list(b" purple")


def test_word_tokenizer_truncates_with_a_warning_and_keeps_max_words():
    tokenizer = WordTokenizer.from_captions(["a b c d e", "a b"], max_length=5, max_words=2)
    assert tokenizer.words == ["a", "b"]  # the two most frequent
    with pytest.warns(UserWarning, match=r"prompt of 4 tokens truncated to 3 "
                                         r"\(max_text_length=5"):
        ids = tokenizer.encode("a b a b")
    assert len(ids) == 5 and ids[-1] == EOS_ID


@pytest.mark.parametrize("words, match", [
    (["a", "a"], "must not repeat"),
    (["two words"], "single words or punctuation"),
    ([""], "single words or punctuation"),
])
def test_bad_vocabularies_are_refused(words, match):
    with pytest.raises(ValueError, match=match):
        WordTokenizer(words)


def test_tokenizer_state_round_trips_and_bad_states_are_named():
    word = WordTokenizer.from_captions(DIGITS, max_length=12)
    for tokenizer in (word, ByteTokenizer(24)):
        rebuilt = tokenizer_from_state(json.loads(json.dumps(tokenizer.state_dict())))
        assert type(rebuilt) is type(tokenizer)
        assert rebuilt.state_dict() == tokenizer.state_dict()
        assert torch.equal(rebuilt(DIGITS)[0], tokenizer(DIGITS)[0])
    with pytest.raises(ValueError, match=r"kind='bpe', expected one of \('byte', 'word'\)"):
        tokenizer_from_state({"kind": "bpe"})


def test_encoder_state_dict_carries_its_vocabulary():
    """A state_dict rebuilds the encoder with its tokenizer (TextEncoder.from_state_dict);
    loading it into an encoder of another vocabulary is refused, naming both."""
    config = tiny_config(tokenizer="word", max_text_length=12)
    encoder = build_text_encoder(config, DIGITS)
    randomize(encoder)
    state = encoder.state_dict()
    assert state[EXTRA_STATE_KEY]["tokenizer"]["words"] == encoder.tokenizer.words
    loaded = TextEncoder.from_state_dict(config, state)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(DIGITS)[0], encoder.encode(DIGITS)[0],
                                   atol=0, rtol=0)
    other = build_text_encoder(config, DIGITS[:5] + ["a photo"])
    with pytest.raises(ValueError, match=r"tokenizer \('word', 13 words\) differs from this "
                                         r"encoder's \('word', 9 words\)"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="holds no tokenizer state"):
        TextEncoder.from_state_dict(config, {k: v for k, v in state.items()
                                             if k != EXTRA_STATE_KEY})


def test_build_text_encoder_reads_captions_only_for_words():
    def no_captions():
        raise AssertionError("the byte tokenizer needs no captions")

    assert isinstance(build_text_encoder(tiny_config(), no_captions).tokenizer, ByteTokenizer)
    encoder = build_text_encoder(tiny_config(tokenizer="word"), lambda: DIGITS)
    assert isinstance(encoder.tokenizer, WordTokenizer)
    assert encoder.token_embedding.num_embeddings == encoder.tokenizer.vocab_size
    with pytest.raises(ValueError, match="learns its vocabulary from the training captions"):
        build_text_encoder(tiny_config(tokenizer="word"))
    with pytest.raises(ValueError, match=r"tokenizer='bpe' is not one of \['byte', 'word'\]"):
        tiny_config(tokenizer="bpe")


def test_encoder_refuses_ids_beyond_its_vocabulary():
    encoder = build_text_encoder(tiny_config(tokenizer="word"), DIGITS)
    too_big = torch.tensor([[BOS_ID, encoder.tokenizer.vocab_size, EOS_ID]])
    with pytest.raises(ValueError, match=rf"token ids in \[0, {encoder.tokenizer.vocab_size}\)"):
        encoder(too_big)


def test_training_captions_of_a_folder(tmp_path):
    from PIL import Image

    for i, caption in enumerate(["a photo of class 3", "a photo of class 4"]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption)
    config = tiny_config(dataset="folder", data_dir=str(tmp_path), tokenizer="word")
    assert training_captions(config) == ["a photo of class 3", "a photo of class 4"]
    encoder = build_text_encoder(config, lambda: training_captions(config))
    assert encoder.tokenizer.words[-2:] == ["3", "4"]


def test_word_checkpoint_samples_with_its_own_vocabulary(tmp_path):
    """A trainer of tokenizer='word' learns the shapes captions' words; its checkpoint holds
    them, and a pipeline loaded from it encodes prompts exactly as the trainer did."""
    config = tiny_config(tokenizer="word")
    torch.manual_seed(0)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config)
    assert trainer.text_encoder.tokenizer.words == WordTokenizer.from_captions(
        all_captions()).words
    path = trainer.save_checkpoint(tmp_path / "word.pt")
    pipeline = AdvancedDiffusionPipeline.from_checkpoint(path, use_ema=False)
    prompts = ["a red circle", "a blue cross", ""]
    with torch.no_grad():
        torch.testing.assert_close(pipeline.text_encoder.encode(prompts)[0],
                                   trainer.text_encoder.encode(prompts)[0], atol=0, rtol=0)
    assert pipeline.text_encoder.tokenizer.words == trainer.text_encoder.tokenizer.words


def test_checkpoint_without_tokenizer_state_loads_as_bytes(tmp_path):
    """Checkpoints written before the tokenizer was saved hold no _extra_state: they were all
    byte-level, and load as such."""
    config = tiny_config()
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config)
    path = trainer.save_checkpoint(tmp_path / "new.pt")
    state = torch.load(path, weights_only=True)
    del state["text_encoder"][EXTRA_STATE_KEY]
    torch.save(state, tmp_path / "old.pt")
    loaded = load_checkpoint_file(tmp_path / "old.pt")
    assert loaded["text_encoder"][EXTRA_STATE_KEY] == {"tokenizer": {"kind": "byte",
                                                                     "max_length": 77}}
    pipeline = AdvancedDiffusionPipeline.from_checkpoint(tmp_path / "old.pt", use_ema=False)
    assert isinstance(pipeline.text_encoder.tokenizer, ByteTokenizer)


def test_pipeline_refuses_an_encoder_of_another_tokenizer():
    config = tiny_config(tokenizer="word")
    encoder = build_text_encoder(tiny_config(), None)  # byte
    with pytest.raises(ValueError, match=r"tokenizer: text_encoder 'byte' vs config 'word'"):
        AdvancedDiffusionPipeline(config, text_encoder=encoder)


# ---- the caption summary (text_pooling="bag") ----

def summary_pair(num_layers=1):
    """An encoder without a summary and one with it, sharing every other weight."""
    torch.manual_seed(0)
    plain = TextEncoder(context_dim=16, width=32, num_layers=num_layers, max_length=40)
    randomize(plain)
    bagged = TextEncoder(context_dim=16, width=32, num_layers=num_layers, max_length=40,
                         summary=True)
    missing = bagged.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["summary.weight"]
    return plain, bagged


def test_untrained_summary_changes_nothing():
    """The summary table starts at zero: the encoder's states are those of one without it."""
    plain, bagged = summary_pair()
    assert not bagged.summary.weight.any()
    with torch.no_grad():
        torch.testing.assert_close(bagged.encode(["a red circle", "ok"])[0],
                                   plain.encode(["a red circle", "ok"])[0])


@given(st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_summary_is_the_sum_of_the_prompts_token_rows(prompts):
    """Oracle: state 0 gains the sum of the summary rows of the prompt's real tokens (BOS and
    EOS included, padding not); every other state is unchanged."""
    plain, bagged = summary_pair()
    with torch.no_grad():
        bagged.summary.weight.normal_(generator=torch.Generator().manual_seed(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long prompts are truncated
            ids, mask = bagged.tokenizer(prompts)
        ref, _ = plain(ids, mask)
        out, _ = bagged(ids, mask)
        rows = bagged.summary.weight
        expected = torch.stack([rows[row[keep]].sum(0) for row, keep in zip(ids, mask)])
        torch.testing.assert_close(out[:, 0] - ref[:, 0], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 1:], ref[:, 1:])


def test_summary_moves_by_a_whole_row_for_one_character():
    """Prompts that differ in one byte ("digit 3" / "digit 4") get summaries that differ by
    exactly the difference of those bytes' rows, however long the prompt: nothing averages
    it away (a mean over ~20 bytes would move by a twentieth)."""
    _, bagged = summary_pair(num_layers=0)  # no transformer: only the summary sees both
    with torch.no_grad():
        bagged.summary.weight.normal_(generator=torch.Generator().manual_seed(4))
        states, _ = bagged.encode([DIGITS[3], DIGITS[4]])
        rows = bagged.summary.weight
        torch.testing.assert_close(states[0, 0] - states[1, 0], rows[ord("3")] - rows[ord("4")],
                                   atol=1e-5, rtol=1e-5)


def test_summary_is_built_from_the_config_and_saved():
    """config.text_pooling="bag" builds the summary; its table is in the state_dict, and a
    checkpoint of one kind does not load into the other."""
    config = tiny_config(pooled_text_conditioning=True, text_pooling="bag")
    encoder = build_text_encoder(config)
    assert encoder.has_summary and not build_text_encoder(tiny_config()).has_summary
    assert encoder.summary.weight.shape == (VOCAB_SIZE, config.context_dim)
    loaded = TextEncoder.from_state_dict(config, encoder.state_dict())
    assert torch.equal(loaded.summary.weight, encoder.summary.weight)
    with pytest.raises(RuntimeError, match="summary.weight"):
        TextEncoder.from_config(tiny_config()).load_state_dict(encoder.state_dict())
    with pytest.raises(ValueError, match=r"text_pooling: text_encoder has_summary=False vs "
                                         r"config 'bag'"):
        AdvancedDiffusionPipeline(config, text_encoder=build_text_encoder(tiny_config()))
