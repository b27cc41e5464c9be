"""The quickstart's last step: the Serve app started on a trained store answers a real test user."""

import socket

from sidrec.pipeline import demo_user, serve_demo


def test_serve_demo_answers_a_real_test_user(trained_store, capsys):
    cfg, _ = trained_store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = serve_demo(cfg, port=port)
    user = demo_user(cfg)
    items = answer["items"]
    assert len(items) == 5 and all(it["title"] and it["sid"].startswith("<a_") for it in items)
    assert not {it["item_id"] for it in items} & set(user["history"])  # quickstart excludes the history
    out = capsys.readouterr().out
    assert f"test user {user['user_id']}" in out and items[0]["title"] in out
