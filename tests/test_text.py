from seqrec.data.text import CALREC_WORD_LIMITS, clean_text, format_item_text, is_usable_title, parse_item_text


def test_clean_text_strips_html_and_entities():
    assert clean_text('<span class="a-size-medium a-color-secondary"') == ""
    assert clean_text("Fish &amp; Chips <b>weekly</b>") == "Fish & Chips weekly"
    assert clean_text(["a", None, " b  c "]) == "a b c"
    assert clean_text(None) == ""
    assert clean_text("3 > 2") == "3 > 2"  # a lone '>' is text, not markup


def test_usable_title():
    assert not is_usable_title(clean_text('<span class="x"'))
    assert is_usable_title("Wired 2018")


def test_format_item_text_template_and_unknown():
    text = format_item_text("Drill", ["Tools", "Power Tools"], None, 19.5)
    assert text == "Title: Drill Category: Tools > Power Tools Brand: Unknown Price: $19.50"
    assert parse_item_text(text) == {"title": "Drill", "category": "Tools > Power Tools", "brand": "Unknown", "price": "$19.50"}


def test_calrec_truncation():
    title = " ".join(f"w{i}" for i in range(40))
    text = format_item_text(title, "c " * 20, "b " * 20, "p " * 20, word_limits=CALREC_WORD_LIMITS)
    fields = parse_item_text(text)
    assert len(fields["title"].split()) == 25
    assert len(fields["category"].split()) == 15
    assert len(fields["brand"].split()) == 15
    assert len(fields["price"].split()) == 15
