"""Texts and the chat template of the generate tests' tiny tokenizer (a module with a name of its own: a test
that imported them ``from conftest`` got tests/serve's conftest when both directories ran in one session)."""

TEXTS = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void.",
         "And God said, Let there be light: and there was light.", "the the and and light earth heaven"] * 20
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
