#!/usr/bin/env python3
"""MSAL for Python, unmodified, against `mailscope sandbox --tls`: trusted through MSAL's own
`verify=<CA file>` option, no proxy and no patched session (tests/msal/check_sandbox.py covers
more of MSAL over plain http). Graph calls use `requests` with the token MSAL returned."""
import sys

import msal

from common import CRM_APP_ID, CRM_SECRET, GRAPH_SCOPE, Env, claims


def main():
    env = Env()
    print("msal %s against %s" % (msal.__version__, env.url))
    env.restrict_crm_to_sales()

    def client(client_id, secret):
        return msal.ConfidentialClientApplication(
            client_id, client_credential=secret, authority="%s/%s" % (env.url, env.tenant),
            instance_discovery=False, verify=env.ca_file)

    crm = client(CRM_APP_ID, CRM_SECRET).acquire_token_for_client(scopes=[GRAPH_SCOPE])
    if not env.check("access_token" in crm, "token for the CRM app: %s" % crm.get("error_description", "")[:160]):
        return env.finish("msal")
    env.check("Mail.Read" in claims(crm["access_token"]).get("roles", []), "its roles include Mail.Read")
    mgmt = client(env.client_id, env.client_secret).acquire_token_for_client(scopes=[GRAPH_SCOPE])
    env.check("access_token" in mgmt, "token for the management app")

    s = env.session()
    h = {"Authorization": "Bearer " + crm["access_token"]}
    users = s.get(env.url + "/v1.0/users", headers=h, timeout=30)
    env.check(users.status_code == 200 and len(users.json().get("value", [])) > 3, "list users")
    domain = env.domain(u.get("userPrincipalName") for u in users.json().get("value", []))
    alice = s.get("%s/v1.0/users/alice@%s/messages?$top=2" % (env.url, domain), headers=h, timeout=30)
    env.check(alice.status_code == 200 and isinstance(alice.json().get("value"), list), "read a mailbox in scope (alice)")
    bob = s.get("%s/v1.0/users/bob@%s/messages" % (env.url, domain), headers=h, timeout=30)
    env.check(bob.status_code == 403 and bob.json()["error"]["code"] == "ErrorAccessDenied", "ErrorAccessDenied out of scope (bob)")

    mh = {"Authorization": "Bearer " + mgmt.get("access_token", "")}
    created = s.post(env.url + "/v1.0/applications", headers=mh, json={"displayName": "msal tls check"}, timeout=30)
    env.check(created.status_code == 201, "create an application")
    if created.status_code == 201:
        pw = s.post("%s/v1.0/applications/%s/addPassword" % (env.url, created.json()["id"]), headers=mh,
                    json={"passwordCredential": {"displayName": "check"}}, timeout=30)
        env.check(pw.status_code == 200 and len(pw.json().get("secretText", "")) >= 16, "add a password")
        s.delete("%s/v1.0/applications/%s" % (env.url, created.json()["id"]), headers=mh, timeout=30)
    return env.finish("msal")


if __name__ == "__main__":
    sys.exit(main())
