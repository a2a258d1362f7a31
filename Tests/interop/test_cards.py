"""Character Card V2/V3 import and export through the real server: JSON and PNG cards, clear
refusals, a lossless round trip, and the lorebook and post-history instructions in the prompt a
provider receives."""
import base64
import json
import struct
import urllib.request
import zlib

from conftest import ROOT, Server
from schemas import validate_rest
from test_interop import chat_once
from test_providers import fake_openai  # noqa: F401 (a fixture)

CARDS = ROOT / "Tests" / "fixtures" / "cards"


def png(text_chunks):
    """A 1×1 PNG carrying `text_chunks` (keyword, text) as tEXt, written with zlib, not Parley."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0))
    for keyword, text in text_chunks:
        raw += chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))
    return raw + chunk(b"IDAT", zlib.compress(b"\0\0\0\0\0")) + chunk(b"IEND", b"")


def post_raw(server, path, token, body, content_type):
    req = urllib.request.Request(server.base + path, data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_cards_import_and_export_losslessly(data_dir):
    server = Server(data_dir, "--max-card-bytes", "65536")
    try:
        token = server.token("alice")
        v2 = json.loads((CARDS / "v2-full.json").read_text())
        status, mara = server.http("POST", "/v1/clones/import", token, v2)
        assert status == 201, mara
        validate_rest("clone", mara)
        assert mara["name"] == "Captain Mara" and mara["sliders"] == {"warmth": 35, "humor": 60}
        assert mara["profile"]["lorebook"][0]["keys"] == ["guild", "Skyguild"]
        status, card = server.http("GET", f"/v1/clones/{mara['id']}/card?spec=v2", token)
        assert status == 200 and card == v2, "import then export gives back the card"
        validate_rest("character-card", card)

        status, v3 = server.http("GET", f"/v1/clones/{mara['id']}/card?spec=v3", token)
        assert status == 200 and v3["spec"] == "chara_card_v3" and v3["data"]["group_only_greetings"] == []
        validate_rest("character-card", v3)
        # A clone exported and imported again is the same clone.
        status, again = post_raw(server, "/v1/clones/import", token, png([("ccv3", base64.b64encode(json.dumps(v3).encode()).decode())]),
                                 "image/png")
        assert status == 201, again
        strip = lambda c: {k: v for k, v in c.items() if k not in ("id", "created_at", "updated_at")}  # noqa: E731
        assert strip(again) == strip(mara)

        ilse = json.loads((CARDS / "v3-full.json").read_text())
        status, clone = post_raw(server, "/v1/clones/import", token, png([("chara", base64.b64encode(json.dumps(ilse).encode()).decode())]),
                                 "image/png")
        assert status == 201 and clone["name"] == "Professor Ilse" and clone["model"] == "simulated"

        # Refusals: each a clear 400 (or 413) with a JSON error body.
        cases = [
            (png([("Comment", "a picture")]), "image/png", 400, "no character card"),
            (png([("chara", "bm90IGpzb24=")]), "image/png", 400, "not valid JSON"),
            (png([("chara", "e30=")])[:-6], "image/png", 400, "truncated"),
            (b'{"spec":"chara_card_v2","data":{"description":"no name"}}', "application/json", 400, "no 'data.name'"),
            (b'{"spec":"chara_card_v1","data":{"name":"A"}}', "application/json", 400, "unsupported card spec 'chara_card_v1'"),
            (b"{not json", "application/json", 400, "not valid JSON"),
            (b'{"spec":"chara_card_v2","data":{"name":"A","extensions":{"parley":{"model":"gpt-nope"}}}}', "application/json", 400,
             "model 'gpt-nope' is not offered"),
            (png([("chara", "A" * 70000)]), "image/png", 413, "larger than 65536 bytes"),
        ]
        for body, content_type, code, words in cases:
            status, error = post_raw(server, "/v1/clones/import", token, body, content_type)
            assert status == code and words in error["error"]["message"], (words, status, error)
            validate_rest("error", error)
        # A normal REST body keeps its 1 MiB cap; the card cap applies to the import route only.
        status, _ = server.http("POST", "/v1/clones", token, {"name": "x" * 10, "system_prompt": "y" * 10000})
        assert status == 201

        status, error = server.http("GET", f"/v1/clones/{mara['id']}/card?spec=v9", token)
        assert status == 400 and "spec must be v2 or v3" in error["error"]["message"]
        status, _ = server.http("GET", f"/v1/clones/{mara['id']}/card", server.token("bob"))
        assert status == 404, "another user's clone is not theirs to export"
        assert server.http("GET", "/v1/clones", token)[1]["clones"][0]["profile"]["post_history_instructions"] == "Keep replies under three sentences."
    finally:
        assert server.stop() == 0


def test_an_imported_lorebook_reaches_the_provider(data_dir, fake_openai):  # noqa: F811
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"fake-model": {"input_per_1k": 1, "output_per_1k": 1}}}))
    server = Server(data_dir, "--provider", "openai", "--provider-url", f"http://127.0.0.1:{fake_openai}/v1",
                    "--provider-model", "fake-model", "--prices", str(prices))
    try:
        token = server.token("alice")
        status, mara = server.http("POST", "/v1/clones/import", token, json.loads((CARDS / "v2-full.json").read_text()))
        assert status == 201

        def chat(text):
            chat_once(server, token, mara["id"], text)
            with urllib.request.urlopen(f"http://127.0.0.1:{fake_openai}/v1/requests", timeout=10) as resp:
                return json.loads(resp.read())[-1]["body"]["messages"]

        quiet = chat("Nice weather.")
        assert "Skyguild taxes" not in quiet[0]["content"]
        asked = chat("Tell me about the guild's tax.")
        system = asked[0]["content"]
        assert asked[0]["role"] == "system" and "The Skyguild taxes every cargo that crosses the Rift." in system
        assert "Captain Mara commands the airship Kestrel" in system and "{{char}}" not in system
        assert asked[-2] == {"role": "user", "content": "Tell me about the guild's tax."}
        assert asked[-1] == {"role": "system", "content": "Keep replies under three sentences."}, "post-history instructions come last"
    finally:
        assert server.stop() == 0


def test_what_a_v3_card_asks_of_the_prompt_reaches_the_provider(data_dir, fake_openai):  # noqa: F811
    """Through the real import, store and provider: the nickname stands for {{char}}, {{original}}
    for nothing, the character's note sits at its depth, decorator lines (followed: @@depth) and
    <START> markers stay out, a selective entry waits for its secondary key (or, by SillyTavern's selectiveLogic, for
    its absence), an entry placed at a depth goes there, and the greeting chosen opens the chat."""
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"fake-model": {"input_per_1k": 1, "output_per_1k": 1}}}))
    server = Server(data_dir, "--provider", "openai", "--provider-url", f"http://127.0.0.1:{fake_openai}/v1",
                    "--provider-model", "fake-model", "--prices", str(prices))
    card = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {
        "name": "Captain Mara Vell", "nickname": "Mara", "system_prompt": "{{original}}Stay in character as {{char}}.",
        "description": "<BOT> flies the Kestrel.", "first_mes": "Ahoy.", "alternate_greetings": ["{{char}} tips her hat."],
        "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Ahoy.\n<START>\n{{char}}: Off you go.",
        "extensions": {"depth_prompt": {"prompt": "{{char}} is tired.", "depth": 1, "role": "system"}},
        "character_book": {"entries": [
            {"keys": ["engine"], "content": "@@depth 4\n\nThe engine runs on storm-glass.", "enabled": True, "insertion_order": 1,
             "extensions": {}, "use_regex": False},
            {"keys": ["guild"], "content": "The guild taxes cargo.", "selective": True, "secondary_keys": ["tax"], "enabled": True,
             "insertion_order": 2, "extensions": {}, "use_regex": False},
            {"keys": ["engine"], "content": "{{char}} hears the engine.", "enabled": True, "insertion_order": 3, "use_regex": False,
             "extensions": {"position": 4, "depth": 0, "role": 0}},
            {"keys": ["engine"], "content": "The engine is a secret.", "selective": True, "secondary_keys": ["guild"], "enabled": True,
             "insertion_order": 4, "use_regex": False, "extensions": {"selectiveLogic": 2}}]}}}
    try:
        token = server.token("alice")
        status, mara = server.http("POST", "/v1/clones/import", token, card)
        assert status == 201, mara
        assert mara["greetings"] == ["Ahoy.", "Mara tips her hat."]

        async def first_chat():
            import websockets
            async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/ws?token={token}") as ws:
                assert json.loads(await ws.recv())["type"] == "welcome"
                await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": mara["id"], "greeting": 1,
                                          "text": "How is the engine? And the guild?"}))
                while (frame := json.loads(await ws.recv()))["type"] != "stream.end":
                    assert frame["type"] != "error", frame
        import asyncio
        asyncio.run(first_chat())
        with urllib.request.urlopen(f"http://127.0.0.1:{fake_openai}/v1/requests", timeout=10) as resp:
            messages = json.loads(resp.read())[-1]["body"]["messages"]
        system = messages[0]["content"]
        assert system.startswith("Stay in character as Mara.\nYou are Captain Mara Vell.\nDescription: Mara flies the Kestrel."), system
        assert "Examples of how you speak:\nUser: Hi\nMara: Ahoy.\n\nMara: Off you go." in system and "<START>" not in system
        assert "storm-glass" not in system and "@@" not in system, "@@depth 4 puts the engine's entry among the messages"
        assert "guild taxes" not in system, "the selective entry waits for 'tax'"
        assert "engine is a secret" not in system, "selectiveLogic 2 (none of them): 'guild' was said"
        assert "hears the engine" not in system, "an entry placed at a depth is among the messages"
        assert [(m["role"], m["content"]) for m in messages[1:]] == [
            ("system", "The engine runs on storm-glass."), ("assistant", "Mara tips her hat."), ("system", "Mara is tired."),
            ("user", "How is the engine? And the guild?"), ("system", "Mara hears the engine.")], messages
    finally:
        assert server.stop() == 0


def test_a_users_persona_reaches_the_provider_and_goes_with_the_account(data_dir, store_args, fake_openai):  # noqa: F811
    """`PUT /v1/me/persona` through the real binary on both stores: the card's {{user}} is her
    name in the greeting and the prompt, the system message says who the clone talks with, `GET
    /v1/me` and the export show it (both by their schemas), and deleting the account deletes it."""
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"fake-model": {"input_per_1k": 1, "output_per_1k": 1}}}))
    server = Server(data_dir, "--provider", "openai", "--provider-url", f"http://127.0.0.1:{fake_openai}/v1",
                    "--provider-model", "fake-model", "--prices", str(prices), *store_args)
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Seraphina", "description": "{{char}} guards the glade for {{user}}.", "first_mes": "Welcome, {{user}}."}}
    try:
        token = server.token("alice")
        status, refused = server.http("PUT", "/v1/me/persona", token, {"name": ""})
        assert status == 400 and validate_rest("error", refused)["error"]["code"] == "bad_request", refused
        status, persona = server.http("PUT", "/v1/me/persona", token, {"name": "Ana", "description": "A cartographer."})
        assert status == 200 and validate_rest("persona", persona) == {"name": "Ana", "description": "A cartographer."}
        status, me = server.http("GET", "/v1/me", token)
        assert status == 200 and validate_rest("me", me)["persona"] == persona, me
        status, seraphina = server.http("POST", "/v1/clones/import", token, card)
        assert status == 201 and seraphina["greeting"] == "Welcome, Ana.", seraphina
        chat_once(server, token, seraphina["id"], "Hello")
        with urllib.request.urlopen(f"http://127.0.0.1:{fake_openai}/v1/requests", timeout=10) as resp:
            messages = json.loads(resp.read())[-1]["body"]["messages"]
        system = messages[0]["content"]
        assert "Description: Seraphina guards the glade for Ana.\nYou are talking with Ana.\nAbout Ana: A cartographer." in system, system
        assert [(m["role"], m["content"]) for m in messages[1:]] == [("assistant", "Welcome, Ana."), ("user", "Hello")], messages
        status, export = server.http("GET", "/v1/me/export", token)
        assert status == 200 and validate_rest("export", export)["account"]["persona"] == persona

        assert server.http("DELETE", "/v1/me", token)[0] == 200
        token = server.token("alice")
        status, gone = server.http("GET", "/v1/me/persona", token)
        assert status == 404 and gone["error"]["code"] == "not_found", gone
        assert server.http("GET", "/v1/me", token)[1]["persona"] is None
    finally:
        assert server.stop() == 0
