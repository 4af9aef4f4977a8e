"""The probe set of the original experiment (docs/design.md), as data."""

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
ANSWER = "Berlin"

# Final-layer-only probes, top-10 each.
TEST_PROMPTS = (
    "Berlin is the capital of",
    "Germany's capital city is called simply",
    "The capital city of Germany is named simply",
    "Germany has its capital at the city called simply",
    "In Germany the capital city is simply",
    "Germany's capital city is called",
    "The capital city of Germany is named",
    "Germany has its capital at",
    "In Germany the capital city is known as",
    "Give the country name only, plain text. Berlin is the capital of",
    "Give the city name only, plain text. Germany's capital city is called",
    "Give the city name only, plain text. The capital city of Germany is named simply",
    "Give the city name only, plain text. Germany has its capital at",
    "Give the city name only, plain text. In Germany, the capital city is known as",
)
TEMPERATURES = (0.1, 2.0)

TOP_K_RECORDS = 5  # per position
TOP_K_VERBOSE = 20  # at the last position and at positions holding one of VERBOSE_WORDS
VERBOSE_WORDS = ("Germany", "Berlin", "capital", "Answer", "word", "simply")

NO_TEST_PROMPTS = ("none: the original's test prompts ask for Germany's capital and belong to its "
                   "prompt; give your own (--probe, or run's test_prompts)")


def probe_prompts(prompt: str, given: tuple[str, ...] | None) -> tuple[tuple[str, ...], str]:
    """A run's final-layer probes and where they come from: the given ones; else the original's
    with its own prompt, and none with another (Germany probes are no finding of a Paris run)."""
    if given is not None:
        return given, "given"
    return (TEST_PROMPTS, "original") if prompt == PROMPT else ((), NO_TEST_PROMPTS)


def verbose_words_for(prompt: str) -> tuple[str, ...]:
    """The words whose positions get TOP_K_VERBOSE candidates: the original's, chosen for its
    prompt; none with another (its last position still gets them)."""
    return VERBOSE_WORDS if prompt == PROMPT else ()
