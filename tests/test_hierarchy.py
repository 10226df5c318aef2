"""Organizations, projects, products and their links, on every database."""

import pytest

from keycap import AlreadyExistsError, APIKeyClient, InvalidArgumentError, NotFoundError


async def test_an_organization_is_created_found_listed_and_deleted(client: APIKeyClient) -> None:
    org = await client.create_organization("Acme")
    assert org.id.startswith("org_") and org.name == "Acme"
    assert await client.get_organization(org.id) == org
    with pytest.raises(AlreadyExistsError) as info:
        await client.create_organization("Acme")
    assert info.value.existing_id == org.id
    again, created = await client.get_or_create_organization("Acme")
    assert (again, created) == (org, False)
    other, created = await client.get_or_create_organization("acme")  # case-sensitive names
    assert created and other.id != org.id
    assert sorted(o.name for o in await client.list_organizations()) == ["Acme", "acme"]
    await client.delete_organization(org.id)
    with pytest.raises(NotFoundError):
        await client.get_organization(org.id)
    with pytest.raises(NotFoundError):
        await client.delete_organization(org.id)


async def test_names_are_unique_within_their_parent_only(client: APIKeyClient) -> None:
    a = await client.create_organization("A")
    b = await client.create_organization("B")
    pa = await client.create_project(a.id, "agents")
    pb = await client.create_project(b.id, "agents")
    assert pa.id != pb.id
    with pytest.raises(AlreadyExistsError) as info:
        await client.create_project(a.id, "agents")
    assert info.value.existing_id == pa.id
    prod, created = await client.get_or_create_product(a.id, "agents")  # own namespace
    assert created
    assert (await client.get_or_create_product(a.id, "agents")) == (prod, False)
    assert (await client.get_or_create_project(a.id, "agents")) == (pa, False)
    assert [p.id for p in await client.list_projects(a.id)] == [pa.id]
    assert [p.id for p in await client.list_products(b.id)] == []


async def test_children_need_an_existing_organization(client: APIKeyClient) -> None:
    with pytest.raises(NotFoundError):
        await client.create_project("org_AAAAAAAAAAAAAAAA", "p")
    with pytest.raises(NotFoundError):
        await client.get_or_create_product("org_AAAAAAAAAAAAAAAA", "p")


async def test_linking_a_product_is_idempotent_and_within_one_organization(
    client: APIKeyClient,
) -> None:
    a = await client.create_organization("A")
    b = await client.create_organization("B")
    project = await client.create_project(a.id, "agents")
    product = await client.create_product(a.id, "chat")
    foreign = await client.create_product(b.id, "chat")
    assert await client.add_product_to_project(product.id, project.id) is True
    assert await client.add_product_to_project(product.id, project.id) is False  # idempotent
    with pytest.raises(InvalidArgumentError):
        await client.add_product_to_project(foreign.id, project.id)
    with pytest.raises(NotFoundError):
        await client.add_product_to_project("prod_AAAAAAAAAAAAAAAA", project.id)
    assert await client.remove_product_from_project(product.id, project.id) is True
    assert await client.remove_product_from_project(product.id, project.id) is False


async def test_deleting_an_organization_cascades_to_everything_under_it(
    client: APIKeyClient,
) -> None:
    org = await client.create_organization("A")
    project = await client.create_project(org.id, "p")
    product = await client.create_product(org.id, "x")
    await client.add_product_to_project(product.id, project.id)
    key = (await client.create_key(org.id, project_id=project.id, product_id=product.id)).key
    await client.delete_organization(org.id)
    for getter, id_ in [
        (client.get_project, project.id),
        (client.get_product, product.id),
        (client.get_key, key.id),
    ]:
        with pytest.raises(NotFoundError):
            await getter(id_)


async def test_deleting_a_product_deletes_keys_narrowed_to_it(client: APIKeyClient) -> None:
    # A key restricted to a product must never survive as a wider, org-wide key.
    org = await client.create_organization("A")
    product = await client.create_product(org.id, "x")
    narrowed = (await client.create_key(org.id, product_id=product.id)).key
    wide = (await client.create_key(org.id)).key
    await client.delete_product(product.id)
    with pytest.raises(NotFoundError):
        await client.get_key(narrowed.id)
    assert (await client.get_key(wide.id)).id == wide.id


async def test_deleting_a_project_deletes_its_keys(client: APIKeyClient) -> None:
    org = await client.create_organization("A")
    project = await client.create_project(org.id, "p")
    key = (await client.create_key(org.id, project_id=project.id)).key
    await client.delete_project(project.id)
    with pytest.raises(NotFoundError):
        await client.get_key(key.id)
