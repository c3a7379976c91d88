"""Image pull secrets and the API key Secret."""

from __future__ import annotations

import base64
import json

import chart_helpers as ch
import pytest
from chart_helpers import BASE, container_of, isvc_of

pytestmark = ch.needs_helm

# ------------------------------------------------------------------------------------------------
# Image pull secrets
# ------------------------------------------------------------------------------------------------

def _pull_secret_names(objects):
    return [s["name"] for s in isvc_of(objects)["spec"]["predictor"].get("imagePullSecrets", [])]


def test_pull_secret_existing_names():
    objects = ch.template(BASE, overrides={"pullSecret": {"existing": ["regcred", "mirror"]}})
    assert _pull_secret_names(objects) == ["regcred", "mirror"]
    assert ch.by_kind(objects, "Secret") == []
    assert ch.one(objects, "ServiceAccount")["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]


def test_pull_secret_from_registry_credentials():
    objects = ch.template(BASE, overrides={"pullSecret": {
        "existing": ["regcred"], "server": "registry.example.com", "username": "robot", "password": "s3cret",
        "email": "ops@example.com"}})
    secret = ch.one(objects, "Secret")
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert secret["metadata"]["name"] == "t-llm-predictor-pull-secret"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    entry = config["auths"]["registry.example.com"]
    assert base64.b64decode(entry["auth"]).decode() == "robot:s3cret"
    assert entry["username"] == "robot" and entry["password"] == "s3cret" and entry["email"] == "ops@example.com"
    assert _pull_secret_names(objects) == ["regcred", "t-llm-predictor-pull-secret"]


def test_pull_secret_from_dockerconfigjson():
    doc = json.dumps({"auths": {"ghcr.io": {"auth": base64.b64encode(b"u:p").decode()}}})
    objects = ch.template(BASE, overrides={"pullSecret": {"existing": [], "dockerConfigJson": doc, "name": "ghcr"}})
    secret = ch.one(objects, "Secret")
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert base64.b64decode(secret["data"][".dockerconfigjson"]).decode() == doc
    assert _pull_secret_names(objects) == ["ghcr"]


@pytest.mark.parametrize(("pull_secret", "message"), [
    ({"server": "registry.example.com", "username": "robot"},
     "registry credentials need all of pullSecret.server, pullSecret.username and pullSecret.password"),
    ({"server": "https://registry.example.com", "username": "u", "password": "p"},
     "pullSecret.server must be a registry host"),
    ({"server": "r.example.com", "username": "u", "password": "p", "dockerConfigJson": '{"auths":{}}'},
     "give either registry credentials (server, username, password) or dockerConfigJson, not both"),
    ({"dockerConfigJson": "not json"}, 'pullSecret.dockerConfigJson must be a JSON document with an "auths" object'),
])
def test_pull_secret_misconfiguration(pull_secret, message):
    assert message in ch.template_error(BASE, overrides={"pullSecret": pull_secret})


def test_pull_secret_existing_given_as_a_string_shows_the_list_form():
    """Issue 20: `--set pullSecret.existing=regcred` got the schema's bare "got string, want array"."""
    error = ch.template_error(BASE, sets=("pullSecret.existing=regcred",))
    assert 'pullSecret.existing is a list of Secret names, not the string "regcred"' in error
    assert "--set 'pullSecret.existing={regcred}'" in error and "existing: [regcred]" in error
    assert _pull_secret_names(ch.template(BASE, sets=("pullSecret.existing={regcred}",))) == ["regcred"]


@pytest.mark.parametrize(("given", "message"), [
    (("pullSecret.existing={regcred,}",), 'pullSecret.existing[1] is empty (got ["regcred",""])'),
    (("pullSecret.existing[0]= ",), 'pullSecret.existing[0] is empty (got [" "])'),
])
def test_pull_secret_existing_with_an_empty_name_names_it(given, message):
    error = ch.template_error("examples/demo-cpu.yaml", sets=given)
    assert message in error and "each entry names an image pull Secret in the release namespace" in error


def test_no_pull_secret_at_all():
    objects = ch.template("examples/demo-cpu.yaml")
    assert "imagePullSecrets" not in isvc_of(objects)["spec"]["predictor"]


# ------------------------------------------------------------------------------------------------
# API key
# ------------------------------------------------------------------------------------------------

def test_api_key_from_value_creates_a_secret():
    objects = ch.template(BASE, overrides={"apiKey": {"value": "k3y"}})
    secret = ch.one(objects, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "k3y"
    env = {e["name"]: e for e in container_of(objects)["env"]}
    assert env["PREDICTOR_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                      "key": "api-key"}
    test_pod = ch.one(objects, "Pod")
    assert "PREDICTOR_API_KEY" in {e["name"] for e in test_pod["spec"]["containers"][0]["env"]}


def test_api_key_from_existing_secret():
    objects = ch.template("examples/mistral-7b-instruct.yaml")
    assert ch.by_kind(objects, "Secret") == []
    env = {e["name"]: e for e in container_of(objects)["env"]}
    assert env["PREDICTOR_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mistral-api-key"


def test_no_api_key_by_default():
    env = {e["name"] for e in container_of(ch.template(BASE))["env"]}
    assert "PREDICTOR_API_KEY" not in env
