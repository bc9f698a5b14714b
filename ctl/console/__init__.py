"""The district console (``ttcs-ctl serve``, docs/CONSOLE.md): a web page in Vietnamese for the
staff who run the loudspeakers and boards — fleet, devices, bulletins, schedules, boards, alerts,
reports and audit — over the relay's store, with users, roles and a record of every action.

Modules: :mod:`.tables` (the console's own tables on the relay's database), :mod:`.users`
(accounts, roles, argon2id, lock-out), :mod:`.sessions` (cookies and CSRF tokens),
:mod:`.audit` (who did what, commands sent and their acks), :mod:`.fleet` (read queries and
the live fleet snapshot), :mod:`.live` (server-sent events), :mod:`.link` (the console's MQTT
client), :mod:`.compose` (bulletins as signed commands), :mod:`.documents` (schedule and board
pushes), :mod:`.app` and ``pages_*`` (the web application), :mod:`.serve` (the process).
"""
