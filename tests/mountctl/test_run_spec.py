"""mountctl.spec and the pure parts of mountctl.idmap: no I/O, no mounts."""

from __future__ import annotations

from typing import Any

import pytest

from mountctl import idmap
from mountctl.spec import (
    DEFAULT_PATH,
    RunOptions,
    SpecError,
    Volume,
    build_spec,
    check_name,
    parse_group,
    parse_passwd,
    parse_user,
    parse_volume,
    resolve_user,
)

PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"# a comment\n"
          b"user:x:1000:1000:user:/home/user:/bin/sh\n"
          b"broken line\n"
          b"svc:x:70:71::/var/svc:/bin/false\n")
GROUP = b"root:x:0:\nuser:x:1000:\nwheel:x:10:user,other\nsvcgrp:x:71:\naudio:x:29:svc\n"


def cfg(**settings: Any) -> dict[str, Any]:
    return {"config": settings}


def spec(config: dict[str, Any] | None = None, **flags: Any) -> Any:
    return build_spec(config if config is not None else cfg(Cmd=["sh"]), RunOptions(**flags),
                      host_env={"HOSTVAR": "from-host"}, cwd="/work",
                      default_hostname="abcdef012345")


def test_argv_rules() -> None:
    image = cfg(Entrypoint=["/bin/sh", "-c"], Cmd=["echo hi"])
    assert spec(image).argv == ("/bin/sh", "-c", "echo hi")
    assert spec(image, command=("exit 3",)).argv == ("/bin/sh", "-c", "exit 3")
    # --entrypoint replaces the entrypoint and drops the image's Cmd
    assert spec(image, entrypoint="/bin/echo").argv == ("/bin/echo",)
    assert spec(image, entrypoint="/bin/echo", command=("a",)).argv == ("/bin/echo", "a")
    assert spec(image, entrypoint="", command=("ls", "-l")).argv == ("ls", "-l")
    assert spec(cfg(Cmd=["top"]), command=("ls",)).argv == ("ls",)
    assert spec(cfg(Entrypoint="/init")).argv == ("/init",)
    with pytest.raises(SpecError, match="no command to run"):
        spec(cfg())
    with pytest.raises(SpecError, match="Cmd is not a list of strings"):
        spec(cfg(Cmd=[1]))
    with pytest.raises(SpecError, match="'config' is not an object"):
        spec({"config": "x"})


def test_env_rules() -> None:
    s = spec(cfg(Cmd=["sh"], Env=["A=1", "PATH=/bin", "B=x=y"]),
             env=("A=2", "C=3", "HOSTVAR", "UNSET", "EMPTY="))
    assert s.env == ("PATH=/bin", "A=2", "B=x=y", "C=3", "HOSTVAR=from-host", "EMPTY=")
    assert spec().env == (f"PATH={DEFAULT_PATH}",)
    assert spec().with_home("/root").env_dict()["HOME"] == "/root"
    assert spec(env=("HOME=/x",)).with_home("/root").env_dict()["HOME"] == "/x"
    for bad in ("=x", "A\0=1", "A=\0"):
        with pytest.raises(SpecError, match="invalid environment variable"):
            spec(env=(bad,))


def test_workdir_user_hostname() -> None:
    assert spec().workdir == "/"
    assert spec(cfg(Cmd=["sh"], WorkingDir="data/x")).workdir == "/data/x"
    assert spec(workdir="/a/../b/").workdir == "/b"
    with pytest.raises(SpecError, match="must be an absolute path"):
        spec(workdir="rel")
    assert spec(cfg(Cmd=["sh"], User="1000:1000")).user == "1000:1000"
    assert spec(cfg(Cmd=["sh"], User="1000"), user="0").user == "0"
    assert spec().hostname == "abcdef012345"
    assert spec(hostname="web-1.local").hostname == "web-1.local"
    for bad in ("-x", "a..b", "x" * 65, "a_b", ""):
        with pytest.raises(SpecError, match="invalid hostname"):
            spec(hostname=bad)
    with pytest.raises(SpecError, match="invalid user"):
        spec(user="a:")
    with pytest.raises(SpecError, match="invalid driver"):
        spec(driver="zfs")


def test_volumes() -> None:
    assert parse_volume("/src:/dst", "/") == Volume("/src", "/dst", False)
    assert parse_volume("rel/dir:/dst/:ro", "/work") == Volume("/work/rel/dir", "/dst", True)
    assert parse_volume("/s:/d:rw", "/") == Volume("/s", "/d", False)
    for bad, why in (("/s", "expected SRC:DST"), ("/s:/d:rx", "unknown option 'rx'"),
                     ("/s:rel", "must be an absolute path"), ("/s:/", "container's root"),
                     ("/a:/b:ro:x", "expected SRC:DST")):
        with pytest.raises(SpecError, match=why):
            parse_volume(bad, "/")
    with pytest.raises(SpecError, match="two volumes on /d"):
        spec(volumes=("/a:/d", "/b:/d/"))


def test_names() -> None:
    assert check_name("web_1.a-b") == "web_1.a-b"
    for bad in ("", "-x", "a/b", "a b", "x" * 129):
        with pytest.raises(SpecError, match="invalid container name"):
            check_name(bad)


def test_passwd_and_group_parsing() -> None:
    users = parse_passwd(PASSWD)
    assert [(u.name, u.uid, u.gid, u.home) for u in users] == [
        ("root", 0, 0, "/root"), ("user", 1000, 1000, "/home/user"), ("svc", 70, 71, "/var/svc")]
    groups = parse_group(GROUP)
    assert [(g.name, g.gid, g.members) for g in groups][2] == ("wheel", 10, ("user", "other"))


def test_resolve_user() -> None:
    r = resolve_user
    assert r("", PASSWD, GROUP) == r("0", PASSWD, GROUP) == r("root", PASSWD, GROUP)
    assert r("", PASSWD, GROUP).home == "/root"
    u = r("user", PASSWD, GROUP)
    assert (u.uid, u.gid, u.groups, u.home) == (1000, 1000, (1000, 10), "/home/user")
    assert r("1000", PASSWD, GROUP).groups == (1000, 10)
    s = r("svc:wheel", PASSWD, GROUP)
    assert (s.uid, s.gid, s.groups) == (70, 10, (10, 29))
    assert r("svc:5", PASSWD, GROUP).gid == 5
    n = r("4242", PASSWD, GROUP)  # unknown numeric uid: gid 0, home /
    assert (n.uid, n.gid, n.groups, n.home) == (4242, 0, (0,), "/")
    assert r("4242:7", None, None).gid == 7
    with pytest.raises(SpecError, match="user 'nobody' not found"):
        r("nobody", PASSWD, GROUP)
    with pytest.raises(SpecError, match="group 'staff' not found"):
        r("user:staff", PASSWD, GROUP)
    with pytest.raises(SpecError, match="out of range"):
        r("99999999999", PASSWD, GROUP)
    assert parse_user("a:b") == ("a", "b")


def test_subid_parsing_and_plans() -> None:
    text = "# ranges\nalice:100000:65536\n1000:300000:10\nbob:x:1\nalice:500000:0\n"
    assert idmap.parse_subid(text, "alice", 1000) == [(100000, 65536), (300000, 10)]
    assert idmap.parse_subid(text, "carol", 1001) == []
    m = idmap.plan(1000, 1000, [(100000, 65536)], [(200000, 70000)], helpers=True)
    assert m.method == "newuidmap"
    assert m.uids == (idmap.IdRange(0, 1000, 1), idmap.IdRange(1, 100000, 65535))
    assert m.gids[1] == idmap.IdRange(1, 200000, 65535)
    assert m.maps_uid(1000) and m.maps_uid(65535) and not m.maps_uid(65536)
    assert idmap.plan(1000, 1000, [(1, 2)], [(1, 2)], helpers=False) == idmap.single(1000, 1000)
    assert idmap.plan(1000, 1000, [], [(1, 2)], helpers=True).method == "single"
    s = idmap.single(1000, 1001)
    assert s.maps_uid(0) and not s.maps_uid(1) and s.rootless
    assert idmap.IdMap.from_json(m.to_json()) == m
    assert idmap.IdMap.from_json(None) == idmap.HOST and not idmap.HOST.rootless
