"""A tus upload (API.md "Resumable uploads") is an upload like a POST /images: the image it
makes sends its `created` webhook event, it is held to the quotas from its creation on (and
counted against them until it ends), and it is counted in /metrics and written to the audit
log as stored or refused. Flask's test client, on every engine."""

import json

import test_webhooks
from test_tus import upload_in_pieces

import jobs

hook, receiver = test_webhooks.hook, test_webhooks.receiver  # their fixtures, here too

# --- webhooks ----------------------------------------------------------------------------


def test_a_tus_upload_sends_the_created_event_of_its_image(client, alice, hook, receiver,
                                                           qcow2_bytes):
    team = receiver()
    hook("team@alice", team.url)
    _, last = upload_in_pieces(client, alice, qcow2_bytes, [70_000], name="alpine",
                               namespace="team")
    assert last.status_code == 204
    assert jobs.run_due_jobs() == 1
    (sent,) = team.wait_for(1)
    assert sent["signed"]
    image = client.get(last.headers["Image-Location"], headers=alice.headers).get_json()
    assert json.loads(sent["body"]) == {"action": "created", "image": image}
