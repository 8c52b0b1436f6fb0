"""The one list of document kinds: which kinds may hold which modalities."""

from mom.data.kinds import KIND_MODALITIES, KINDS, kinds_that_may_hold


def test_kinds_are_the_keys_of_kind_modalities():
    assert KINDS == ("text", "image_caption", "caption_image", "speech_transcript", "transcript_speech", "mixed")
    assert set(KINDS) == set(KIND_MODALITIES)


def test_kinds_that_may_hold_a_modality():
    assert kinds_that_may_hold(["speech"]) == ["speech_transcript", "transcript_speech", "mixed"]
    assert kinds_that_may_hold({"image"}) == ["image_caption", "caption_image", "mixed"]
    assert kinds_that_may_hold({"image", "speech"}) == [k for k in KINDS if k != "text"]
    assert kinds_that_may_hold(["text"]) == list(KINDS)  # every document has <s> and </s>
    assert kinds_that_may_hold(["video"]) == ["mixed"]  # mixed documents may hold any modality of the corpus
