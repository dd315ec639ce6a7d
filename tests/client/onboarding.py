"""The README's onboarding, driven through a Python client generated from openapi/openapi.json.

Usage: onboarding.py CLIENT_DIR   (the directory holding the generated `mailscope_client` package)

Reads API_URL, API_TOKEN and the sandbox's SANDBOX_URL, SANDBOX_TENANT_ID,
SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET from the environment. Every step says what it expected
when the answer differs, with the problem the service sent.
"""
import os
import sys
import uuid

sys.path.insert(0, sys.argv[1])

from mailscope_client import AuthenticatedClient  # noqa: E402
from mailscope_client.api.access_policies import access_test, create_policy  # noqa: E402
from mailscope_client.api.applications import add_secret, put_application  # noqa: E402
from mailscope_client.api.propagation_checks import get_check  # noqa: E402
from mailscope_client.api.scope_groups import put_scope_group  # noqa: E402
from mailscope_client.api.tenants import connection_test, put_tenant  # noqa: E402
from mailscope_client.models import (  # noqa: E402
    AccessPolicyInput, AccessRight, AccessTestInput, ApplicationInput, CheckState, Cloud,
    CredentialsInput, EndpointOverrides, Problem, ScopeGroupInput, SecretInput, StepStatus,
    TenantInput, VerifiedBy,
)

env = os.environ
TENANT = uuid.UUID(env["SANDBOX_TENANT_ID"])
DOMAIN = "contoso-sandbox.onmicrosoft.com"
client = AuthenticatedClient(base_url=env["API_URL"], token=env["API_TOKEN"],
                             raise_on_unexpected_status=True, timeout=90)


def call(step, want, op, **kwargs):
    """Call a generated operation; fail with the step's name and the problem unless the status is in `want`."""
    res = op.sync_detailed(client=client, **kwargs)
    if res.status_code not in want:
        detail = res.parsed.to_dict() if isinstance(res.parsed, Problem) else res.content[:500]
        sys.exit(f"FAIL {step}: expected {sorted(want)}, got {res.status_code}: {detail}")
    print(f"ok   {step}: {res.status_code}")
    return res.parsed


def expect(step, condition, what):
    if not condition:
        sys.exit(f"FAIL {step}: {what}")


s = env["SANDBOX_URL"]
call("register the sandbox tenant", {200, 201}, put_tenant, tenant_id=TENANT, body=TenantInput(
    display_name="Contoso (sandbox)", cloud=Cloud.CUSTOM, default_domain=DOMAIN,
    endpoints=EndpointOverrides(login=s, graph=s, exchange=s),
    credentials=CredentialsInput(client_id=uuid.UUID(env["SANDBOX_CLIENT_ID"]),
                                 client_secret=env["SANDBOX_CLIENT_SECRET"])))

report = call("connection test", {200}, connection_test, tenant_id=TENANT)
failed = [f"{st.step}: {st.cause}" for st in report.steps if st.status != StepStatus.PASSED]
expect("connection test", not failed, f"steps did not pass: {failed}")

group = call("scope group", {200, 201}, put_scope_group, tenant_id=TENANT, alias="acme-scope",
             body=ScopeGroupInput(members=[f"alice@{DOMAIN}"]))
expect("scope group", group.members == [f"alice@{DOMAIN}"], f"members are {group.members}")

app = call("application", {200, 201}, put_application, tenant_id=TENANT, key="acme",
           body=ApplicationInput(display_name="ACME mail sync", permissions=["Mail.Read"],
                                 grant_admin_consent=True))
expect("application", app.app_id is not None, "no app_id")

key = f"acme-secret-{uuid.uuid4()}"
secret = call("secret", {201}, add_secret, tenant_id=TENANT, key="acme", idempotency_key=key,
              body=SecretInput(display_name="acme", lifetime_days=90))
expect("secret", bool(secret.secret_text), "no secret text on the first answer")
again = call("secret, repeated with its Idempotency-Key", {201}, add_secret, tenant_id=TENANT,
             key="acme", idempotency_key=key, body=SecretInput(display_name="acme", lifetime_days=90))
expect("secret replay", again.key_id == secret.key_id, "a second secret was added")

policy = call("access policy", {200, 201}, create_policy, tenant_id=TENANT,
              idempotency_key=f"acme-policy-{uuid.uuid4()}",
              body=AccessPolicyInput(app_id=app.app_id, scope="acme-scope",
                                     access_right=AccessRight.RESTRICTACCESS))
expect("access policy", policy.propagation_check is not None, "no propagation check started")

verdict = call("access test (outside the scope)", {200}, access_test, tenant_id=TENANT,
               body=AccessTestInput(app_id=app.app_id, mailbox=f"bob@{DOMAIN}"))
expect("access test", verdict.local.granted is False and verdict.agree,
       f"bob should be denied by both: {verdict.to_dict()}")

check_id = policy.propagation_check.id
for _ in range(20):
    check = call("propagation check", {200}, get_check, tenant_id=TENANT, id=check_id, wait=30)
    if check.state not in (CheckState.QUEUED, CheckState.RUNNING):
        break
expect("propagation check", check.state == CheckState.SUCCEEDED,
       f"ended {check.state}: {check.reason}")
expect("propagation check", check.verified_by == VerifiedBy.GRAPH,
       f"verified by {check.verified_by}, not Graph as the app")
print("onboarding through the generated client: ok")
