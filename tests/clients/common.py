"""Shared by the client checks: the sandbox's coordinates, a check recorder, and the setup that
restricts the sandbox's CRM app to the Sales Team with an application access policy.

The coordinates come from the lines `mailscope sandbox --tls` prints (SANDBOX_URL, _TENANT_ID,
_CLIENT_ID, _CLIENT_SECRET, _CA_FILE). The setup uses plain `requests` trusting the CA file; the
checks themselves use only the client library under test.
"""
import base64
import json
import os
import sys

import requests

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
CRM_APP_ID = "b9701c1e-1364-464d-93e4-01ae925e8d6c"
CRM_SECRET = "sandbox-crm-secret-not-for-production"
ANCHOR = "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@%s"


class Env:
    def __init__(self):
        missing = [k for k in ("URL", "TENANT_ID", "CLIENT_ID", "CLIENT_SECRET", "CA_FILE") if not os.environ.get("SANDBOX_" + k)]
        if missing:
            sys.exit("missing SANDBOX_%s (run through tests/clients/run.sh)" % ", SANDBOX_".join(missing))
        self.url = os.environ["SANDBOX_URL"].rstrip("/")
        if not self.url.startswith("https://"):
            sys.exit("SANDBOX_URL must be https (start the sandbox with --tls)")
        self.host = self.url[len("https://"):]
        self.tenant = os.environ["SANDBOX_TENANT_ID"]
        self.client_id = os.environ["SANDBOX_CLIENT_ID"]
        self.client_secret = os.environ["SANDBOX_CLIENT_SECRET"]
        self.ca_file = os.environ["SANDBOX_CA_FILE"]
        self.failures = []

    def check(self, condition, what):
        print(("ok   " if condition else "FAIL ") + what, flush=True)
        if not condition:
            self.failures.append(what)
        return condition

    def finish(self, name):
        print("%s: %s" % (name, "%d check(s) failed" % len(self.failures) if self.failures else "all checks passed"))
        return 1 if self.failures else 0

    def session(self):
        s = requests.Session()
        s.trust_env = False
        s.verify = self.ca_file
        return s

    @staticmethod
    def domain(upns):
        """The tenant's domain, from the user principal names a user list returned."""
        return next(u.split("@", 1)[1] for u in upns if u and u.startswith("alice@"))

    def restrict_crm_to_sales(self):
        """RestrictAccess for the CRM app on the Sales Team (alice in, bob out), with plain requests."""
        s = self.session()
        tok = s.post("%s/%s/oauth2/v2.0/token" % (self.url, self.tenant), data={
            "grant_type": "client_credentials", "client_id": self.client_id,
            "client_secret": self.client_secret, "scope": EXCHANGE_SCOPE}, timeout=30).json()["access_token"]
        body = {"CmdletInput": {"CmdletName": "New-ApplicationAccessPolicy", "Parameters": {
            "AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess", "Description": " "}}}
        r = s.post("%s/adminapi/beta/%s/InvokeCommand" % (self.url, self.tenant), json=body, timeout=30,
                   headers={"Authorization": "Bearer " + tok, "X-AnchorMailbox": ANCHOR % self.tenant})
        # 400 "already exists" when an earlier script made it.
        if r.status_code not in (200, 400):
            sys.exit("setup: New-ApplicationAccessPolicy answered %d: %s" % (r.status_code, r.text[:300]))


def claims(token):
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))
