mod sandbox_helpers;
mod sandbox_login;
