#!/usr/bin/env python3
"""Fidelity check of `mailscope sandbox` with Microsoft's own client library (MSAL for Python).

Starts nothing itself. Reads the sandbox URL and the management app's credentials from the
environment (as `mailscope sandbox` prints them) or from arguments:

    SANDBOX_URL=http://127.0.0.1:8090 SANDBOX_TENANT_ID=... SANDBOX_CLIENT_ID=... \
    SANDBOX_CLIENT_SECRET=... python3 tests/msal/check_sandbox.py [--check-propagation]

MSAL only accepts https authorities and endpoints. This check runs the sandbox over plain http
(`mailscope sandbox --tls` and tests/clients/ cover MSAL, azure-identity and the Graph SDK over
https with nothing patched), so the script
gives MSAL an `https://` authority and an HTTP session (MSAL's documented `http_client` extension
point) that sends requests for the sandbox's host over http with `X-Forwarded-Proto: https`, as a
TLS-terminating proxy would; the sandbox then advertises https endpoints. Everything else is MSAL's unmodified logic:
authority handling with `validate_authority=False` / `instance_discovery=False`, OpenID
discovery, client secret and certificate (x5t and x5t#S256) assertions, error parsing, caching.

Exit status 0 when every check passes.
"""
import argparse
import base64
import json
import os
import sys
import time
import urllib.parse

import msal
import requests

GRAPH_SCOPE = ["https://graph.microsoft.com/.default"]
EXCHANGE_SCOPE = ["https://outlook.office365.com/.default"]
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
MAIL_READ_ROLE = "810c84a8-4a9e-49e6-bf7d-12d183f40d01"
ANCHOR = "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@%s"
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "api", "sandbox_fixtures")

failures = []


def check(condition, what):
    print(("ok   " if condition else "FAIL ") + what)
    if not condition:
        failures.append(what)
    return condition


class SandboxSession(requests.Session):
    """Send https requests for the sandbox host over http (the sandbox has no TLS)."""

    def __init__(self, host):
        super().__init__()
        self.trust_env = False
        self.host = host

    def request(self, method, url, *args, **kwargs):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https" and parts.netloc == self.host:
            url = urllib.parse.urlunsplit(("http",) + tuple(parts[1:]))
            # As a TLS-terminating proxy would: the sandbox then advertises https endpoints,
            # which MSAL insists on.
            headers = dict(kwargs.pop("headers", None) or {})
            headers["X-Forwarded-Proto"] = "https"
            kwargs["headers"] = headers
        return super().request(method, url, *args, **kwargs)


def claims(token):
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))


def app(client_id, credential, host, tenant, session):
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority="https://%s/%s" % (host, tenant),
        validate_authority=False,
        instance_discovery=False,
        http_client=session,
    )


def invoke(base, tenant, token, cmdlet, parameters=None, url=None, prefer=None):
    body = {"CmdletInput": {"CmdletName": cmdlet}}
    if parameters is not None:
        body["CmdletInput"]["Parameters"] = parameters
    headers = {
        "Authorization": "Bearer " + token,
        "X-AnchorMailbox": ANCHOR % tenant,
        "Content-Type": "application/json; charset=utf-8",
        "X-ResponseFormat": "json",
    }
    if prefer:
        headers["Prefer"] = prefer
    return requests.post(url or "%s/adminapi/beta/%s/InvokeCommand" % (base, tenant), json=body, headers=headers, timeout=30)


def strip_annotations(obj):
    return {k: v for k, v in obj.items() if "@" not in k}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("SANDBOX_URL"))
    p.add_argument("--tenant", default=os.environ.get("SANDBOX_TENANT_ID"))
    p.add_argument("--client-id", default=os.environ.get("SANDBOX_CLIENT_ID"))
    p.add_argument("--client-secret", default=os.environ.get("SANDBOX_CLIENT_SECRET"))
    p.add_argument("--check-propagation", action="store_true",
                   help="also wait (up to --wait seconds) for a policy to reach Graph; start the sandbox with short delays")
    p.add_argument("--wait", type=float, default=60.0)
    a = p.parse_args()
    if not all([a.url, a.tenant, a.client_id, a.client_secret]):
        p.error("sandbox URL, tenant id, client id and secret are required (env SANDBOX_* or flags)")
    base = a.url.rstrip("/")
    host = urllib.parse.urlsplit(base).netloc
    session = SandboxSession(host)
    print("msal %s against %s" % (msal.__version__, base))

    # --- Tokens with a client secret --------------------------------------------------------
    mgmt = app(a.client_id, a.client_secret, host, a.tenant, session)
    g = mgmt.acquire_token_for_client(scopes=GRAPH_SCOPE)
    check("access_token" in g, "MSAL acquires a Graph token with a client secret: %s" % g.get("error_description", "")[:120])
    if "access_token" not in g:
        return 1
    check(g.get("token_type") == "Bearer" and isinstance(g.get("expires_in"), int), "token response has token_type Bearer and integer expires_in")
    gc = claims(g["access_token"])
    check(gc.get("aud") == "https://graph.microsoft.com", "Graph token aud is https://graph.microsoft.com")
    check(gc.get("tid") == a.tenant and gc.get("appid") == a.client_id, "token carries tid and appid")
    check("Application.ReadWrite.All" in gc.get("roles", []), "Graph token carries the app's roles")
    again = mgmt.acquire_token_for_client(scopes=GRAPH_SCOPE)
    check(again.get("access_token") == g["access_token"], "MSAL serves the second request from its cache")
    x = mgmt.acquire_token_for_client(scopes=EXCHANGE_SCOPE)
    check("access_token" in x, "MSAL acquires an Exchange token")
    xc = claims(x["access_token"])
    check(xc.get("aud") == "https://outlook.office365.com", "Exchange token aud is https://outlook.office365.com")
    check("Exchange.ManageAsApp" in xc.get("roles", []), "Exchange token carries Exchange.ManageAsApp")

    bad = app(a.client_id, "not-the-secret", host, a.tenant, SandboxSession(host)).acquire_token_for_client(scopes=GRAPH_SCOPE)
    check(bad.get("error") == "invalid_client" and 7000215 in bad.get("error_codes", []), "MSAL surfaces AADSTS7000215 for a bad secret")
    unknown = app("00000000-1111-2222-3333-444444444444", "x", host, a.tenant, SandboxSession(host)).acquire_token_for_client(scopes=GRAPH_SCOPE)
    check(700016 in unknown.get("error_codes", []), "MSAL surfaces AADSTS700016 for an unknown app")

    gh = {"Authorization": "Bearer " + g["access_token"]}
    xt = x["access_token"]

    # --- Graph --------------------------------------------------------------------------------
    org = requests.get(base + "/v1.0/organization", headers=gh, timeout=30)
    check(org.status_code == 200 and org.json()["value"][0]["id"] == a.tenant, "GET /v1.0/organization")
    sp = requests.get(base + "/v1.0/servicePrincipals(appId='%s')?$select=id,appRoles" % GRAPH_APP_ID, headers=gh, timeout=30).json()
    roles = {r["value"]: r for r in sp.get("appRoles", [])}
    check(roles.get("Mail.Read", {}).get("id") == MAIL_READ_ROLE and "Application" in roles["Mail.Read"]["allowedMemberTypes"],
          "Graph service principal exposes Mail.Read with its real id")
    users, url, pages = [], base + "/v1.0/users?$top=3", 0
    while url:
        page = requests.get(url, headers=gh, timeout=30).json()
        users += page["value"]
        url = page.get("@odata.nextLink")
        pages += 1
    check(pages > 1 and len({u["id"] for u in users}) == len(users), "users page with @odata.nextLink (%d users, %d pages)" % (len(users), pages))
    err = requests.get(base + "/v1.0/applications/does-not-exist", headers=gh, timeout=30)
    e = err.json().get("error", {})
    check(err.status_code == 404 and e.get("code") and "request-id" in e.get("innerError", {}), "Graph error shape with innerError.request-id")

    # Register an app as mailscope would: application, secret, service principal, Mail.Read grant.
    created = requests.post(base + "/v1.0/applications", headers=gh, json={"displayName": "msal fidelity check",
                            "requiredResourceAccess": [{"resourceAppId": GRAPH_APP_ID, "resourceAccess": [{"id": MAIL_READ_ROLE, "type": "Role"}]}]}, timeout=30)
    check(created.status_code == 201, "POST /v1.0/applications")
    app_obj, app_id = created.json()["id"], created.json()["appId"]
    pw = requests.post(base + "/v1.0/applications/%s/addPassword" % app_obj, headers=gh, json={"passwordCredential": {"displayName": "check"}}, timeout=30).json()
    check(len(pw.get("secretText", "")) >= 16 and pw.get("hint") == pw["secretText"][:3], "addPassword returns secretText and hint")
    new_sp = requests.post(base + "/v1.0/servicePrincipals", headers=gh, json={"appId": app_id}, timeout=30)
    check(new_sp.status_code == 201, "POST /v1.0/servicePrincipals")
    grant = requests.post(base + "/v1.0/servicePrincipals/%s/appRoleAssignedTo" % sp["id"], headers=gh,
                          json={"principalId": new_sp.json()["id"], "resourceId": sp["id"], "appRoleId": MAIL_READ_ROLE}, timeout=30)
    check(grant.status_code == 201 and grant.json().get("principalType") == "ServicePrincipal", "POST appRoleAssignedTo")
    reader = app(app_id, pw["secretText"], host, a.tenant, SandboxSession(host)).acquire_token_for_client(scopes=GRAPH_SCOPE)
    check("Mail.Read" in claims(reader.get("access_token", "a.e30.b")).get("roles", []), "the new app's token carries Mail.Read")
    rh = {"Authorization": "Bearer " + reader.get("access_token", "")}
    domain = requests.get(base + "/v1.0/organization", headers=gh, timeout=30).json()["value"][0]["verifiedDomains"][0]["name"]
    alice, bob = "alice@" + domain, "bob@" + domain
    msgs = requests.get(base + "/v1.0/users/%s/messages?$top=2" % alice, headers=rh, timeout=30)
    check(msgs.status_code == 200 and isinstance(msgs.json().get("value"), list), "app-only GET /users/{upn}/messages")
    contacts = requests.get(base + "/v1.0/users/%s/contacts" % alice, headers=rh, timeout=30)
    check(contacts.status_code == 403 and contacts.json()["error"]["code"] == "ErrorAccessDenied", "missing permission is 403 ErrorAccessDenied")

    # --- Certificates (x5t and x5t#S256) ------------------------------------------------------
    try:
        cert = open(os.path.join(FIXTURES, "test-app-cert.pem")).read()
        key = open(os.path.join(FIXTURES, "test-app-key.pem")).read()
        der = base64.b64decode("".join(l for l in cert.splitlines() if "-----" not in l))
        patched = requests.patch(base + "/v1.0/applications/%s" % app_obj, headers=gh, json={"keyCredentials": [
            {"type": "AsymmetricX509Cert", "usage": "Verify", "key": base64.b64encode(der).decode()}]}, timeout=30)
        check(patched.status_code == 204, "PATCH keyCredentials registers a certificate")
        import hashlib
        sha1 = hashlib.sha1(der).hexdigest().upper()
        old = app(app_id, {"private_key": key, "thumbprint": sha1}, host, a.tenant, SandboxSession(host)).acquire_token_for_client(scopes=GRAPH_SCOPE)
        check("access_token" in old and claims(old["access_token"]).get("appidacr") == "2",
              "certificate assertion with SHA-1 x5t: %s" % old.get("error_description", "")[:120])
        new = app(app_id, {"private_key": key, "public_certificate": cert}, host, a.tenant, SandboxSession(host)).acquire_token_for_client(scopes=GRAPH_SCOPE)
        check("access_token" in new, "certificate assertion with x5t#S256 (public_certificate): %s" % new.get("error_description", "")[:120])
    except ImportError as exc:  # MSAL needs `cryptography` for certificates
        check(False, "certificate checks need the cryptography package: %s" % exc)

    # --- Exchange InvokeCommand -----------------------------------------------------------------
    r = invoke(base, a.tenant, xt, "Get-OrganizationConfig")
    check(r.status_code == 200 and "value" in r.json(), "parameterless InvokeCommand")
    check(r.headers.get("Content-Type", "").startswith("application/json;odata.metadata=minimal"), "InvokeCommand content type")
    mailboxes, url, pages = [], None, 0
    while True:
        r = invoke(base, a.tenant, xt, "Get-Mailbox", {"ResultSize": "Unlimited"}, url=url, prefer="odata.maxpagesize=2")
        body = r.json()
        mailboxes += [strip_annotations(m) for m in body["value"]]
        pages += 1
        url = body.get("@odata.nextLink")
        if not url:
            break
    check(pages > 1 and all("PrimarySmtpAddress" in m for m in mailboxes), "Get-Mailbox pages through @odata.nextLink (%d mailboxes)" % len(mailboxes))
    check(all("@" not in k for m in mailboxes for k in m), "annotations are separable from values")
    r = invoke(base, a.tenant, xt, "Get-Mailbox", {"Identity": "nobody-here"})
    parts = r.json()["error"]["details"][0]["message"].split("|")
    check(r.status_code == 404 and len(parts) == 3 and parts[1].endswith("ManagementObjectNotFoundException"), "Exchange error details split on '|'")
    r = invoke(base, a.tenant, xt, "New-ApplicationAccessPolicy", {"AppId": app_id, "PolicyScopeGroupId": "Sales Team",
                                                                  "AccessRight": "RestrictAccess", "Description": " "})
    check(r.status_code == 200, "New-ApplicationAccessPolicy")
    pol = strip_annotations(r.json()["value"][0])
    check(pol["Identity"].startswith(a.tenant + "\\" + app_id + ":S-1-5-21-") and ";" in pol["ScopeIdentityRaw"], "policy Identity and ScopeIdentityRaw format")
    t_bob = strip_annotations(invoke(base, a.tenant, xt, "Test-ApplicationAccessPolicy", {"Identity": bob, "AppId": app_id}).json()["value"][0])
    t_alice = strip_annotations(invoke(base, a.tenant, xt, "Test-ApplicationAccessPolicy", {"Identity": alice, "AppId": app_id}).json()["value"][0])
    check(t_bob["AccessCheckResult"] == "Denied" and t_alice["AccessCheckResult"] == "Granted", "Test-ApplicationAccessPolicy sees the change at once")
    if a.check_propagation:
        deadline, seen = time.time() + a.wait, []
        while time.time() < deadline:
            seen = [requests.get(base + "/v1.0/users/%s/messages?$top=1" % bob, headers=rh, timeout=30).status_code for _ in range(6)]
            if all(s == 403 for s in seen):
                break
            time.sleep(0.5)
        check(all(s == 403 for s in seen), "the policy reaches every Graph front end (last sample %s)" % seen)
        denied = requests.get(base + "/v1.0/users/%s/messages" % bob, headers=rh, timeout=30).json()
        check(denied["error"]["code"] == "ErrorAccessDenied", "blocked mailbox answers ErrorAccessDenied")

    print("%d check(s) failed" % len(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
