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
