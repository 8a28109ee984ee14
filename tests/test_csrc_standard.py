"""csrc/ must compile as C++17.

The H200 image's torch 2.11 builds extensions with ``-std=c++17`` (the C++ extension failed there
on ``std::bit_cast``), while torch 2.14 on CI machines passes ``-std=c++20``, and its headers do not
compile as C++17. So no compile here can catch C++20 in our
sources: this test looks for the C++20 library and language features we could reach for.
"""

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"

# What C++20 added that a kernel author might use, as patterns on code with comments stripped.
CXX20_ONLY = {
    "header <bit>, <span>, <concepts>, <ranges>, <numbers>, <format>, <source_location> or <version>":
        r"#\s*include\s*<(bit|span|concepts|ranges|numbers|format|source_location|version)>",
    "std::bit_cast (use memcpy)": r"\bstd::bit_cast\b",
    "std::span": r"\bstd::span\b",
    "std::ranges": r"\bstd::ranges\b",
    "std::numbers": r"\bstd::numbers\b",
    "<bit> functions (popcount, countl_zero, has_single_bit, bit_width, bit_ceil, bit_floor)":
        r"\bstd::(popcount|countl_zero|countr_zero|countl_one|countr_one|has_single_bit|bit_width|bit_ceil|bit_floor|rotl|rotr)\b",
    "std::midpoint / std::lerp / std::ssize / std::erase_if / std::to_address / std::format":
        r"\bstd::(midpoint|lerp|ssize|erase_if|to_address|format)\b",
    "concepts (requires clauses, concept definitions)": r"\brequires\b|\bconcept\s+\w+\s*=",
    "consteval / constinit": r"\b(consteval|constinit)\b",
    "coroutines": r"\bco_(await|yield|return)\b",
    "three-way comparison <=>": r"<=>",
    "[[likely]] / [[unlikely]] / [[no_unique_address]]": r"\[\[\s*(likely|unlikely|no_unique_address)\s*\]\]",
    "starts_with / ends_with / contains members": r"\.(starts_with|ends_with|contains)\s*\(",
    "designated initializers": r"[{,]\s*\.[A-Za-z_]\w*\s*=(?!=)",
}


def _code(path: Path) -> str:
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(?:\\.|[^"\\\n])*"', '""', text)


SOURCES = sorted(p for p in CSRC.iterdir() if p.suffix in {".cpp", ".cu", ".h", ".cuh"})


def test_sources_found():
    assert {p.name for p in SOURCES} >= {"prompt_attention.cpp", "prompt_attention.cu", "bindings.cpp"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_cxx20(path):
    code = _code(path)
    found = [
        f"{what}: line {code.count(chr(10), 0, match.start()) + 1}"
        for what, pattern in CXX20_ONLY.items()
        for match in re.finditer(pattern, code)
    ]
    assert not found, f"{path.name} uses C++20 (torch 2.11 compiles extensions as C++17): {found}"


@pytest.mark.parametrize("snippet", [
    "const V y = p * std::bit_cast<V>(bits);",
    "#include <bit>",
    "auto n = std::popcount(x);",
    "template <typename T> requires std::is_same_v<T, float> void f(T);",
    "Point p{.x = 1, .y = 2};",
    "if (name.starts_with(\"x\")) {}",
])
def test_patterns_catch(snippet, tmp_path):
    """The patterns are not dead: each flags a line of C++20."""
    path = tmp_path / "probe.cpp"
    path.write_text(snippet + "\n")
    code = _code(path)
    assert any(re.search(pattern, code) for pattern in CXX20_ONLY.values())
