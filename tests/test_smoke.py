def test_create_and_get(client, alice, upload):
    created = upload(alice, name="go-dev")
    assert created.status_code == 201, created.json
    got = client.get(f"/images/{created.json['id']}", headers=alice.headers)
    assert got.json["name"] == "go-dev"
