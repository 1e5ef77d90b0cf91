"""The web app's words in English and Simplified Chinese; the browser's language picks one."""

from __future__ import annotations

LANGUAGES = ("en", "zh")

WORDS: dict[str, dict[str, str]] = {
    "en": {
        "title": "vlmtag",
        "search": "Search keywords and descriptions",
        "search_button": "Search",
        "images": "images",
        "sort": "Sort",
        "sort_path": "Path",
        "sort_newest": "Newest",
        "sort_oldest": "Oldest",
        "review": "Review queue",
        "all": "All images",
        "failures": "Failures",
        "runs": "Runs",
        "tags": "Keywords",
        "more_tags": "More",
        "filters": "Filters",
        "clear_filters": "Clear",
        "nothing": "No image matches.",
        "loading": "Loading…",
        "model_kw": "suggested by the model",
        "person_kw": "given by a person",
        "accept_all": "Accept all",
        "add_keyword": "Add a keyword",
        "add": "Add",
        "reject": "Reject",
        "description": "Description",
        "edit": "Edit",
        "save": "Save",
        "cancel": "Cancel",
        "undo": "Undo",
        "close": "Close",
        "previous": "Previous",
        "next": "Next",
        "other_paths": "Same picture at",
        "keys_title": "Keys",
        "keys_help": "j/k or ←/→ move · a accept all · x reject the focused keyword · "
        "t add a keyword · e edit the description · u undo · f full screen · Esc close · ? keys",
        "path": "Path",
        "stage": "Stage",
        "reason": "Reason",
        "when": "When",
        "status": "Status",
        "counts": "Counts",
        "speed": "Images/s",
        "read_only": "read-only",
        "language": "中文",
        "switch_to": "zh",
        "saved": "Saved",
        "export": "Export",
        "exported": "Exported",
        "model": "Model",
        "language_filter": "Language",
        "size": "Size",
        "selected": "selected",
        "error": "Could not save",
    },
    "zh": {
        "title": "vlmtag",
        "search": "搜索关键词和描述",
        "search_button": "搜索",
        "images": "张图片",
        "sort": "排序",
        "sort_path": "路径",
        "sort_newest": "最新",
        "sort_oldest": "最早",
        "review": "待审核",
        "all": "全部图片",
        "failures": "失败",
        "runs": "运行记录",
        "tags": "关键词",
        "more_tags": "更多",
        "filters": "筛选",
        "clear_filters": "清除",
        "nothing": "没有匹配的图片。",
        "loading": "加载中…",
        "model_kw": "模型建议",
        "person_kw": "人工添加",
        "accept_all": "全部接受",
        "add_keyword": "添加关键词",
        "add": "添加",
        "reject": "拒绝",
        "description": "描述",
        "edit": "编辑",
        "save": "保存",
        "cancel": "取消",
        "undo": "撤销",
        "close": "关闭",
        "previous": "上一张",
        "next": "下一张",
        "other_paths": "同一图片的其他路径",
        "keys_title": "快捷键",
        "keys_help": "j/k 或 ←/→ 切换 · a 全部接受 · x 拒绝选中的关键词 · t 添加关键词 · "
        "e 编辑描述 · u 撤销 · f 全屏 · Esc 关闭 · ? 快捷键",
        "path": "路径",
        "stage": "阶段",
        "reason": "原因",
        "when": "时间",
        "status": "状态",
        "counts": "数量",
        "speed": "张/秒",
        "read_only": "只读",
        "language": "English",
        "switch_to": "en",
        "saved": "已保存",
        "export": "导出",
        "exported": "已导出",
        "model": "模型",
        "language_filter": "语言",
        "size": "尺寸",
        "selected": "张已选",
        "error": "保存失败",
    },
}


def choose(asked: str | None, cookie: str | None, accept_language: str | None) -> str:
    """?lang= first, then the cookie the switch set, then the browser's languages."""
    for value in (asked, cookie):
        if value in LANGUAGES:
            return value
    for part in (accept_language or "").split(","):
        code = part.split(";")[0].strip().lower()
        if code.startswith("zh"):
            return "zh"
        if code.startswith("en"):
            return "en"
    return "en"
