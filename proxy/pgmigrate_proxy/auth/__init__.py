"""Authentication of pooled clients, sans-IO: the proxy checks each client's password itself
(SCRAM-SHA-256 or md5 against a verifier from auth_query or auth_file) and logs in server
connections with the ClientKey it recovers from the client's proof, so that no password is
configured.

- `scram`: SCRAM-SHA-256 arithmetic, verifiers, SASLprep, message syntax;
- `credentials`: stored credentials, login secrets, UNKNOWN, fake verifiers, the 28P01 error;
- `frontend`: ClientAuthenticator, the server side of a client's login;
- `backend`: ServerLogin, the proxy's login to PostgreSQL;
- `channel_binding`: the tls-server-end-point hash of a certificate, for SCRAM-SHA-256-PLUS;
- `authfile`: pgbouncer's auth_file format;
- `authquery`: the default auth_query, the SECURITY DEFINER function, a row to a credential.
"""
