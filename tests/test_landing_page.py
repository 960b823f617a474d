"""The landing page as a user sees it: headless Chromium takes a screenshot of it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from PIL import Image

from tests.helpers import config_of, provider_yaml, running
from tests.standins import StandIn, closed_port, ollama_routes

# The page's colours for a verdict (exporter/server.py's stylesheet), as RGB.
UNHEALTHY = (251, 213, 213)
HEALTHY = (212, 244, 221)


def screenshot(url: str, path: Path) -> Image.Image:
    """A 1000x800 screenshot of a page by headless Chromium."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: `make test` installs Debian's chromium package"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={path.parent / 'profile'}", "--window-size=1000,800",
         f"--screenshot={path}", url],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return Image.open(path).convert("RGB")


def first_row_with(image: Image.Image, colour: tuple[int, int, int]) -> int | None:
    """The topmost pixel row that shows a colour, or None."""
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    for y in range(height):
        if any(pixels[x, y] == colour for x in range(0, width, 2)):
            return y
    return None


async def test_the_verdict_comes_first_in_its_colour_then_each_providers_state(
    tmp_path: Path,
) -> None:
    async with StandIn(ollama_routes()) as server:
        config = config_of(
            provider_yaml("home", "ollama", server.url),
            provider_yaml("gone", "ollama", f"http://127.0.0.1:{closed_port()}"),
            rest="host:\n  enabled: false\n",
        )
        async with running(config) as exporter:
            await exporter.scrape()
            image = await asyncio.to_thread(screenshot, exporter.url, tmp_path / "page.png")
    unhealthy, healthy = first_row_with(image, UNHEALTHY), first_row_with(image, HEALTHY)
    # The overall verdict (unhealthy: one provider is down) is the first coloured thing,
    # above the providers table, where the healthy provider's state shows green.
    assert unhealthy is not None and healthy is not None
    assert unhealthy < 150
    assert healthy > unhealthy + 40
