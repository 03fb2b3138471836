"""A small byte-level BPE tokenizer in the Qwen style, trained on the fly for the tiny test models.

The tiny models (`lvr.models.tiny`) need a real tokenizer that behaves like Qwen's where it matters to
the rest of lvr: ChatML turns (`<|im_start|>role\\n...<|im_end|>`), the vision placeholder tokens the
Qwen2.5-VL processor expands, and `<think>`/`<answer>` tags as single tokens. It is trained in well
under a second on a built-in English corpus, so nothing is downloaded.
"""

from __future__ import annotations

import itertools

from tokenizers import AddedToken as RawAddedToken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen special tokens. Special = skipped by `decode(..., skip_special_tokens=True)`.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_PAD = "<|image_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    VIDEO_PAD,
    IMAGE_PAD,
)
# Reasoning tags: single tokens but NOT special, so that decoding with skip_special_tokens=True keeps
# them (rewards and answer extraction parse them), as Qwen3 does for <think>.
REASONING_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# A ChatML template in the Qwen2.5-VL style: string or list content, `{"type": "video"}` /
# `{"type": "image"}` items become `<|vision_start|><|video_pad|><|vision_end|>` (the processor expands
# the pad token to the right count), a default system turn when none is given.
CHAT_TEMPLATE = (
    "{% set ns = namespace(first=true) %}"
    "{% for message in messages %}"
    "{% if ns.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "{% set ns.first = false %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'video' or 'video' in item %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def _words(text: str) -> list[str]:
    """Split a whitespace-separated word list (kept as text so the lists stay readable)."""
    return text.split()


_COLORS = _words("red green blue yellow black white orange purple pink brown gray cyan gold silver")
_SHAPES = _words(
    "circle square triangle star box ball car dog cat person man woman child tree house bird "
    "cup table chair door window road river street kitchen player team ball robot hand phone "
    "book bottle bicycle truck boat train horse camera screen game video scene clip frame "
    "shot object"
)
_ACTIONS = _words(
    "moves appears disappears jumps turns stops falls opens closes enters leaves runs walks "
    "drives throws catches holds picks drops pushes pulls cooks cuts pours eats drinks writes "
    "reads plays speaks looks points waves smiles sits stands climbs rotates changes"
)
_PLACES = _words(
    "left right top bottom center corner middle background foreground edge table floor"
)
_WORDS = _words(
    "the a an and or but because so then after before while during until when where why how "
    "what which who whose whom this that these those there here first second third last next "
    "finally finally begins ends starts continues shows reveals explains suggests indicates "
    "means happens question answer option options choice choices correct wrong true false "
    "reason reasoning step think thinking evidence timestamp seconds minutes minute second "
    "hour beginning end start temporal spatial goal purpose plot narrative event events order "
    "sequence cause effect intention describe detail details caption captions summary "
    "summarize carefully briefly directly letter given following provided based about above "
    "below between inside outside near far toward away from into onto over under with without "
    "across along around behind front other another each every all some many few several more "
    "most less least only also again still already never always often sometimes quickly "
    "slowly suddenly gradually clearly visible hidden small large big little tall short long "
    "bright dark new old young happy sad busy quiet loud fast slow empty full is are was were "
    "be been being has have had do does did can could will would should may might must not no "
    "yes it its they them their he she his her we our you your i me my one two three four "
    "five six seven eight nine ten dozen hundred people camera angle view zoom pan cut "
    "transition sunny rainy night day morning evening indoor outdoor city park beach forest "
    "mountain office store market stage field court studio lab factory warehouse highway "
    "bridge tunnel station assistant user system helpful please video image picture frames "
    "model response json format output valid return list field string number category "
    "difficulty hard easy medium score water food fire light sound music voice face eye head "
    "arm leg foot shirt hat bag box wall sky cloud sun moon snow rain wind grass flower leaf "
    "stone rock sand wave ship plane wheel engine machine tool knife plate bowl pan oven "
    "fridge sink bed sofa lamp clock mirror picture paper pen pencil computer keyboard mouse "
    "monitor cable battery signal map sign light traffic crowd audience teacher student "
    "doctor driver chef worker farmer soldier police family friend baby animal fish insect "
    "spider monkey elephant lion tiger bear wolf deer rabbit sheep cow chicken build break "
    "fix clean wash paint draw sing dance swim fly ride carry lift place put take give show "
    "tell ask say call meet follow lead win lose score kick hit shoot pass block chase hide "
    "find search open close start finish prepare arrange collect count compare measure record "
    "watch notice observe identify recognize remember forget decide choose try help need want "
    "like love because therefore however although unless whether either neither both instead "
    "rather quite very"
)
_QUESTIONS = (
    "What color is the {s} at the {p}?",
    "Which object {a} first in the video?",
    "What happens after the {c} {s} {a}?",
    "Why does the person pick up the {c} {s}?",
    "How many {s}s are visible at the end of the clip?",
    "Where is the {c} {s} when the {s2} {a}?",
    "What is the goal of the person in the video?",
    "Which event happens before the {s} {a} near the {p}?",
)
_SENTENCES = (
    "A {c} {s} {a} near the {p} of the frame.",
    "The video shows a {c} {s} and a {c2} {s2}.",
    "From {n} to {m} seconds, the {s} {a} while the camera stays still.",
    "Checking the video, the {c} {s} is at the {p} before it {a}.",
    "Analyzing the scene, the {s2} {a} after the {s} reaches the {p}.",
    "Elaborate on the visual and narrative elements of the video in detail.",
    "Answer with the option's letter from the given choices directly.",
    "Think step by step inside <think></think>, then give the option letter inside "
    "<answer></answer>.",
    "You are a helpful assistant. Please answer the question about the video.",
    "QUESTION: {q}\nOPTIONS:\nA. {c}\nB. {c2}\nC. {s}\nD. {s2}\nANSWER: {L}\nREASONS: {q}",
    '{{"question": "{q}", "options": ["A. {c}", "B. {c2}"], "answer": "{L}"}}',
    "<think>The {c} {s} {a} first, so the answer is {L}.</think><answer>{L}</answer>",
)


def training_corpus() -> list[str]:
    """Return the built-in English corpus the tiny tokenizer is trained on (deterministic).

    Returns:
        A list of a few thousand short lines: prompts, captions, question templates, options,
        digits, punctuation and the reasoning/answer format.
    """
    lines: list[str] = []
    combos = itertools.product(_COLORS, _SHAPES, _ACTIONS)
    for i, (c, s, a) in enumerate(combos):
        fill = {
            "c": c,
            "s": s,
            "a": a,
            "p": _PLACES[i % len(_PLACES)],
            "c2": _COLORS[(i * 7 + 3) % len(_COLORS)],
            "s2": _SHAPES[(i * 5 + 1) % len(_SHAPES)],
            "n": i % 60,
            "m": i % 60 + 10,
            "L": "ABCD"[i % 4],
        }
        fill["q"] = _QUESTIONS[i % len(_QUESTIONS)].format(**fill)
        lines.append(_SENTENCES[i % len(_SENTENCES)].format(**fill))
        lines.append(fill["q"])
    # Every vocabulary word in several casings and positions, so they become whole tokens.
    words = _WORDS + _COLORS + _SHAPES + _ACTIONS + _PLACES
    for i in range(0, len(words), 7):
        chunk = words[i : i + 7]
        lines.append(" ".join(chunk) + ".")
        lines.append(" ".join(w.capitalize() for w in chunk) + "?")
        lines.append(", ".join(chunk) + "!")
    lines.extend(str(n) for n in range(1000))
    lines.append("0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~` \n\t")
    return lines


def train_tokenizer(vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    Special tokens come after the learned vocabulary (as in Qwen), reasoning tags after them.

    Args:
        vocab_size: Target size of the learned BPE vocabulary (before special tokens).

    Returns:
        A `PreTrainedTokenizerFast` with eos `<|im_end|>`, pad and bos `<|endoftext|>`, the Qwen
        vision tokens, the reasoning tags and the ChatML `CHAT_TEMPLATE`. It adds no token on its
        own (no automatic BOS), like Qwen's.
    """
    raw = Tokenizer(models.BPE())
    # Digits one by one (as Qwen does), then GPT-2 style byte-level splitting.
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(training_corpus(), trainer=trainer)
    raw.add_special_tokens(
        [RawAddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    raw.add_tokens([RawAddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
