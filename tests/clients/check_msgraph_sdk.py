#!/usr/bin/env python3
"""The Microsoft Graph SDK for Python (msgraph-sdk), unmodified, against `mailscope sandbox --tls`.

Everything goes through the SDK's public configuration: an async `ClientSecretCredential`
(azure-identity) pointed at the sandbox, the SDK's own HTTP client factory
(`GraphClientFactory.create_with_default_middleware`) around an `httpx.AsyncClient` whose base URL
is the sandbox's `/v1.0` and which trusts the CA file, and the authentication provider told the
sandbox's host is allowed (it only sends tokens to allowed hosts)."""
import asyncio
import sys

import httpx
from azure.identity.aio import ClientSecretCredential
from kiota_abstractions.api_error import APIError
from kiota_authentication_azure.azure_identity_authentication_provider import AzureIdentityAuthenticationProvider
from msgraph import GraphRequestAdapter, GraphServiceClient
from msgraph.generated.applications.item.add_password.add_password_post_request_body import AddPasswordPostRequestBody
from msgraph.generated.models.application import Application
from msgraph.generated.models.password_credential import PasswordCredential
from msgraph_core import GraphClientFactory

from common import CRM_APP_ID, CRM_SECRET, GRAPH_SCOPE, Env


def graph_client(env, client_id, secret):
    credential = ClientSecretCredential(env.tenant, client_id, secret, authority=env.url,
                                        disable_instance_discovery=True, connection_verify=env.ca_file)
    auth = AzureIdentityAuthenticationProvider(credential, scopes=[GRAPH_SCOPE],
                                               allowed_hosts=[env.host.split(":")[0]])
    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(base_url=env.url + "/v1.0", verify=env.ca_file, trust_env=False))
    return GraphServiceClient(request_adapter=GraphRequestAdapter(auth, client=http)), credential


def error_code(e):
    err = getattr(e, "error", None)
    return getattr(err, "code", None)


async def run(env):
    crm, crm_cred = graph_client(env, CRM_APP_ID, CRM_SECRET)
    mgmt, mgmt_cred = graph_client(env, env.client_id, env.client_secret)
    try:
        users = await crm.users.get()
        env.check(users is not None and len(users.value or []) > 3, "list users (tokens through azure-identity)")
        domain = env.domain(u.user_principal_name for u in users.value or [])
        msgs = await crm.users.by_user_id("alice@" + domain).messages.get()
        env.check(msgs is not None and msgs.value is not None, "read a mailbox in scope (alice)")
        try:
            await crm.users.by_user_id("bob@" + domain).messages.get()
            env.check(False, "ErrorAccessDenied out of scope (bob)")
        except APIError as e:
            env.check(e.response_status_code == 403 and error_code(e) == "ErrorAccessDenied",
                      "ErrorAccessDenied out of scope (bob): %s %s" % (e.response_status_code, error_code(e)))
        app = await mgmt.applications.post(Application(display_name="msgraph-sdk tls check"))
        env.check(app is not None and bool(app.id) and bool(app.app_id), "create an application")
        if app is not None and app.id:
            body = AddPasswordPostRequestBody(password_credential=PasswordCredential(display_name="check"))
            pw = await mgmt.applications.by_application_id(app.id).add_password.post(body)
            env.check(pw is not None and len(pw.secret_text or "") >= 16, "add a password")
            await mgmt.applications.by_application_id(app.id).delete()
    finally:
        await crm_cred.close()
        await mgmt_cred.close()


def main():
    env = Env()
    import msgraph  # noqa: F401
    from importlib.metadata import version
    print("msgraph-sdk %s against %s" % (version("msgraph-sdk"), env.url))
    env.restrict_crm_to_sales()
    try:
        asyncio.run(run(env))
    except Exception as e:  # noqa: BLE001 - any SDK failure is a failed check, with its text
        env.check(False, "the SDK failed: %r" % (e,))
    return env.finish("msgraph-sdk")


if __name__ == "__main__":
    sys.exit(main())
