#!/usr/bin/env python3
"""azure-identity, unmodified, against `mailscope sandbox --tls`: `ClientSecretCredential` with
the sandbox as authority, `disable_instance_discovery=True` and the CA file as
`connection_verify` (azure-core's transport option). Graph calls use `requests` with the token."""
import sys

import azure.identity
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ClientSecretCredential

from common import CRM_APP_ID, CRM_SECRET, GRAPH_SCOPE, Env, claims


def main():
    env = Env()
    print("azure-identity %s against %s" % (azure.identity.__version__ if hasattr(azure.identity, "__version__") else "?", env.url))
    env.restrict_crm_to_sales()

    def credential(client_id, secret):
        return ClientSecretCredential(env.tenant, client_id, secret, authority=env.url,
                                      disable_instance_discovery=True, connection_verify=env.ca_file)

    try:
        crm = credential(CRM_APP_ID, CRM_SECRET).get_token(GRAPH_SCOPE).token
    except ClientAuthenticationError as e:
        env.check(False, "token for the CRM app: %s" % str(e)[:200])
        return env.finish("azure-identity")
    env.check("Mail.Read" in claims(crm).get("roles", []), "token for the CRM app, roles include Mail.Read")
    try:
        credential(env.client_id, "not-the-secret").get_token(GRAPH_SCOPE)
        env.check(False, "a wrong secret is refused")
    except ClientAuthenticationError as e:
        env.check("AADSTS7000215" in str(e), "a wrong secret is refused with AADSTS7000215")
    mgmt = credential(env.client_id, env.client_secret).get_token(GRAPH_SCOPE).token

    s = env.session()
    h = {"Authorization": "Bearer " + crm}
    users = s.get(env.url + "/v1.0/users", headers=h, timeout=30)
    env.check(users.status_code == 200 and len(users.json().get("value", [])) > 3, "list users")
    domain = env.domain(u.get("userPrincipalName") for u in users.json().get("value", []))
    alice = s.get("%s/v1.0/users/alice@%s/messages?$top=2" % (env.url, domain), headers=h, timeout=30)
    env.check(alice.status_code == 200, "read a mailbox in scope (alice)")
    bob = s.get("%s/v1.0/users/bob@%s/messages" % (env.url, domain), headers=h, timeout=30)
    env.check(bob.status_code == 403 and bob.json()["error"]["code"] == "ErrorAccessDenied", "ErrorAccessDenied out of scope (bob)")

    mh = {"Authorization": "Bearer " + mgmt}
    created = s.post(env.url + "/v1.0/applications", headers=mh, json={"displayName": "azure-identity tls check"}, timeout=30)
    env.check(created.status_code == 201, "create an application")
    if created.status_code == 201:
        pw = s.post("%s/v1.0/applications/%s/addPassword" % (env.url, created.json()["id"]), headers=mh,
                    json={"passwordCredential": {"displayName": "check"}}, timeout=30)
        env.check(pw.status_code == 200 and len(pw.json().get("secretText", "")) >= 16, "add a password")
        s.delete("%s/v1.0/applications/%s" % (env.url, created.json()["id"]), headers=mh, timeout=30)
    return env.finish("azure-identity")


if __name__ == "__main__":
    sys.exit(main())
